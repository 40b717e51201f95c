//! Serves a local store over a stream socket (the directory's unix socket, or TCP for
//! `broker serve`): one task per connection, requests handled concurrently, deliveries pushed. When a
//! connection drops, the deliveries it held go back to their queues at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use celery_core::broker::Settle;
use celery_core::{Broker, TaskMeta, TaskState};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::store::LogStore;
use super::stream::{Commit, LocalStream, StartFrom};
use super::wire::{self, kind, settle, Dec, Enc};
use super::{LogBroker, LogConsumer, LogSettle};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Conn {
    held: Mutex<HashMap<u64, LogSettle>>,
    consumers: Mutex<HashMap<u64, tokio::task::JoinHandle<()>>>,
    /// Stream-group members joined over this connection, by the id of their `STREAM_JOIN`; they
    /// leave their groups when the connection closes.
    streams: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<LocalStream>>>>,
    next_delivery: AtomicU64,
}

impl Conn {
    fn stream(&self, handle: u64) -> Result<Arc<tokio::sync::Mutex<LocalStream>>, String> {
        lock(&self.streams).get(&handle).cloned().ok_or_else(|| format!("unknown stream member {handle}"))
    }
}

/// Serves one connection until it closes. `token`: when set, the client's HELLO must carry it.
pub(crate) async fn serve_connection<S>(store: Arc<LogStore>, stream: S, token: Option<String>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = tokio::io::BufReader::with_capacity(wire::READ_BUFFER, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(wire::write_frames(wr, rx));
    let conn = Arc::new(Conn::default());
    let broker = LogBroker::local(store.clone());
    let mut authed = token.is_none();
    loop {
        let frame = match wire::read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "log server: closing a connection");
                break;
            }
        };
        if !authed {
            let ok = frame.kind == kind::HELLO && Dec::new(&frame.body).str().ok() == token;
            let reply = if ok {
                Enc::frame(kind::OK, frame.id).finish()
            } else {
                Enc::frame(kind::ERR, frame.id).str("authentication failed: wrong or missing token").finish()
            };
            let _ = tx.send(reply);
            if !ok {
                // Nothing else holds the writer's channel yet: let it flush the refusal, then close.
                drop(tx);
                let _ = writer.await;
                return;
            }
            authed = true;
            continue;
        }
        if frame.kind == kind::ACK {
            ack_all(&conn, &frame.body);
            continue;
        }
        if let Some(reply) = in_read_order(&conn, &frame) {
            let _ = tx.send(reply);
            continue;
        }
        let (store, broker, conn, tx) = (store.clone(), broker.clone(), conn.clone(), tx.clone());
        tokio::spawn(async move {
            let id = frame.id;
            let reply = match handle(&store, &broker, &conn, &tx, frame).await {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e) => Enc::frame(kind::ERR, id).str(&e).finish(),
            };
            let _ = tx.send(reply);
        });
    }
    for (_, c) in lock(&conn.consumers).drain() {
        c.abort();
    }
    lock(&conn.streams).clear();
    let held: Vec<LogSettle> = lock(&conn.held).drain().map(|(_, s)| s).collect();
    if !held.is_empty() {
        tracing::warn!(deliveries = held.len(), "log server: client gone; returning its deliveries to their queues");
    }
    for s in held {
        let _ = s.requeue().await;
    }
    writer.abort();
}

/// Applies an `ACK` frame (count:u32, delivery:u64*) in read order. It has no answer: what cannot
/// be acked (a malformed frame, wholly; a delivery this connection does not hold) is logged, and
/// the record stays leased until the connection closes, when it goes back to its queue.
fn ack_all(conn: &Conn, body: &[u8]) {
    let mut d = Dec::new(body);
    let ids = d.u32().and_then(|n| (0..n.min(1 << 20)).map(|_| d.u64()).collect::<std::io::Result<Vec<u64>>>());
    let ids = match ids {
        Ok(ids) => ids,
        Err(e) => return tracing::warn!(error = %e, "log server: malformed ACK frame ignored"),
    };
    for delivery in ids {
        match lock(&conn.held).remove(&delivery) {
            Some(s) => {
                if let Err(e) = s.ack_now() {
                    tracing::error!(error = %e, delivery, "log server: ack failed; the record will be delivered again");
                }
            }
            None => tracing::warn!(delivery, "log server: ack of a delivery this connection does not hold"),
        }
    }
}

fn unknown_delivery(delivery: u64) -> String {
    format!("unknown delivery {delivery} (already settled, or returned when a connection dropped)")
}

/// Requests answered in the read loop, in the order they arrive, so that the connection's next
/// request sees them done: stopping a consumer, leaving a stream group, and requeues (which never
/// wait; no task per settlement). A requeue after a stop is then never handed out again by the
/// stopped consumer. None for any other request.
fn in_read_order(conn: &Conn, frame: &wire::Frame) -> Option<Vec<u8>> {
    let mut d = Dec::new(&frame.body);
    let done = |r: Result<(), String>| match r {
        Ok(()) => Enc::frame(kind::OK, frame.id).finish(),
        Err(e) => Enc::frame(kind::ERR, frame.id).str(&e).finish(),
    };
    match frame.kind {
        kind::STOP_CONSUME => Some(done(d.u64().map_err(|e| e.to_string()).map(|consumer| {
            if let Some(t) = lock(&conn.consumers).remove(&consumer) {
                t.abort();
            }
        }))),
        kind::STREAM_LEAVE => Some(done(d.u64().map_err(|e| e.to_string()).map(|member| {
            lock(&conn.streams).remove(&member);
        }))),
        kind::SETTLE => {
            let (delivery, how) = (d.u64().ok()?, d.u8().ok()?);
            if how != settle::REQUEUE {
                return None;
            }
            let Some(s) = lock(&conn.held).remove(&delivery) else {
                return Some(done(Err(unknown_delivery(delivery))));
            };
            s.requeue_now();
            Some(done(Ok(())))
        }
        _ => None,
    }
}

async fn handle(
    store: &Arc<LogStore>,
    broker: &LogBroker,
    conn: &Arc<Conn>,
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    frame: wire::Frame,
) -> Result<Option<Vec<u8>>, String> {
    let id = frame.id;
    let mut d = Dec::new(&frame.body);
    let e = |e: std::io::Error| e.to_string();
    let ok = || Enc::frame(kind::OK, id);
    Ok(Some(match frame.kind {
        kind::HELLO => ok().finish(),
        kind::PUBLISH => {
            let queue = d.str().map_err(e)?;
            let n = d.u32().map_err(e)? as usize;
            let mut records = Vec::with_capacity(n.min(100_000));
            for _ in 0..n {
                let not_before_ms = d.i64().map_err(e)?;
                let key = d.bytes().map_err(e)?.to_vec();
                let payload = d.bytes().map_err(e)?.to_vec();
                records.push(super::NewRecord { not_before_ms, headers: Vec::new(), key, payload });
            }
            store.append(&queue, records).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::CONSUME => {
            let prefetch = d.u32().map_err(e)? as usize;
            let n = d.u32().map_err(e)? as usize;
            let queues = (0..n.min(1024)).map(|_| d.str()).collect::<Result<Vec<_>, _>>().map_err(e)?;
            let mut consumer = broker.local_consumer(&queues, prefetch).map_err(|e| e.to_string())?;
            let (conn2, tx2) = (conn.clone(), tx.clone());
            let task = tokio::spawn(async move {
                while let Some(s) = LogConsumer::next_raw(&mut consumer).await {
                    let delivery = conn2.next_delivery.fetch_add(1, Ordering::Relaxed);
                    let frame = Enc::frame(kind::DELIVERY, id)
                        .u64(delivery)
                        .str(&s.queue)
                        .u32(s.deliveries)
                        .bytes(&s.record.payload)
                        .finish();
                    lock(&conn2.held).insert(delivery, s);
                    if tx2.send(frame).is_err() {
                        break;
                    }
                }
            });
            lock(&conn.consumers).insert(id, task);
            ok().finish()
        }
        kind::SETTLE => {
            let delivery = d.u64().map_err(e)?;
            let how = d.u8().map_err(e)?;
            let not_before = d.i64().map_err(e)?;
            let data = d.bytes().map_err(e)?.to_vec();
            let s = lock(&conn.held).remove(&delivery).ok_or_else(|| unknown_delivery(delivery))?;
            // Requeues were answered by `in_read_order`, acks by `ack_all`.
            let r = match how {
                settle::DEAD_LETTER => s.dead_letter(&String::from_utf8_lossy(&data)).await,
                settle::DEFER => match super::payload::decode(&data).0 {
                    Ok(msg) => {
                        let until =
                            chrono::DateTime::from_timestamp_millis(not_before).unwrap_or_else(chrono::Utc::now);
                        s.defer(&msg, until).await
                    }
                    Err(err) => Err(celery_core::BrokerError::Protocol(err)),
                },
                other => return Err(format!("unknown settlement {other}")),
            };
            r.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::PURGE => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.purge(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::PEEK => super::peek::answer(store, ok(), &mut d)?,
        kind::QUEUE_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.queue_len(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::DELAYED_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(broker.delayed_len(&q).await.map_err(|e| e.to_string())?).finish()
        }
        kind::RESULT_PUT => {
            let rid = d.str().map_err(e)?;
            let doc = d.bytes().map_err(e)?.to_vec();
            let ttl = Duration::from_millis(d.u64().map_err(e)?);
            let stored = store.put_result(&rid, doc, ttl, is_success).await.map_err(|e| e.to_string())?;
            ok().u8(stored as u8).finish()
        }
        kind::RESULT_GET => {
            let rid = d.str().map_err(e)?;
            ok().opt_bytes(store.get_result(&rid).as_deref()).finish()
        }
        kind::RESULT_WAIT => {
            let rid = d.str().map_err(e)?;
            let timeout = Duration::from_millis(d.u64().map_err(e)?);
            let doc = store.wait_result(&rid, timeout, is_ready).await;
            ok().opt_bytes(doc.as_deref()).finish()
        }
        kind::RESULT_FORGET => {
            let rid = d.str().map_err(e)?;
            store.forget_result(&rid).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::LEASE => {
            let name = d.str().map_err(e)?;
            let holder = d.str().map_err(e)?;
            let ttl = Some(Duration::from_millis(d.u64().map_err(e)?)).filter(|t| !t.is_zero());
            let held = store.lease(&name, &holder, ttl).await.map_err(|e| e.to_string())?;
            ok().u64(held as u64).finish()
        }
        kind::BROADCAST => {
            let exchange = d.str().map_err(e)?;
            let routing_key = d.str().map_err(e)?;
            store.broadcast(&exchange, &routing_key, d.bytes().map_err(e)?);
            ok().finish()
        }
        kind::SUBSCRIBE => {
            let exchange = d.str().map_err(e)?;
            let pattern = d.str().map_err(e)?;
            let mut rx = store.subscribe(&exchange, &pattern);
            let tx2 = tx.clone();
            let task = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    let frame =
                        Enc::frame(kind::DELIVERY, id).u64(0).str(&b.routing_key).u32(0).bytes(&b.body).finish();
                    if tx2.send(frame).is_err() {
                        break;
                    }
                }
            });
            lock(&conn.consumers).insert(id, task);
            ok().finish()
        }
        kind::CHORD => {
            let op = d.u8().map_err(e)?;
            let group = d.str().map_err(e)?;
            match op {
                wire::chord::SIZE => {
                    let size = d.u64().map_err(e)? as usize;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    store.chord_size(&group, size, ttl).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                wire::chord::PART => {
                    let member: celery_core::backend::ChordMember =
                        serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    let all = store.chord_part(&group, member, ttl).await.map_err(|e| e.to_string())?;
                    let doc = all.map(|a| serde_json::to_vec(&a)).transpose().map_err(|e| e.to_string())?;
                    ok().opt_bytes(doc.as_deref()).finish()
                }
                wire::chord::DONE => {
                    store.chord_done(&group).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                other => return Err(format!("unknown chord operation {other}")),
            }
        }
        kind::DECLARE => {
            let name = d.str().map_err(e)?;
            let k: celery_core::routing::ExchangeKind = d.str().map_err(e)?.parse()?;
            store.declare_exchange(&name, k).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::BIND => {
            let b: celery_core::routing::Binding =
                serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            store.bind(&b).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::ROUTE => {
            let exchange = d.str().map_err(e)?;
            let key = d.str().map_err(e)?;
            let headers: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            let queues = store.route(&exchange, &key, &headers).map_err(|e| e.to_string())?;
            let mut enc = ok().u32(queues.len() as u32);
            for q in &queues {
                enc = enc.str(q);
            }
            enc.finish()
        }
        kind::STREAM_JOIN => {
            let group = d.str().map_err(e)?;
            let queue = d.str().map_err(e)?;
            let start = if d.u8().map_err(e)? == 0 { StartFrom::Earliest } else { StartFrom::Latest };
            let commit = if d.u8().map_err(e)? == 0 { Commit::AfterProcessing } else { Commit::BeforeProcessing };
            let member = LocalStream::join(store.clone(), &group, &queue, start, commit).map_err(|e| e.to_string())?;
            lock(&conn.streams).insert(id, Arc::new(tokio::sync::Mutex::new(member)));
            ok().u64(id).finish()
        }
        kind::STREAM_POLL => {
            let member = conn.stream(d.u64().map_err(e)?)?;
            let max = d.u32().map_err(e)? as usize;
            let timeout = Duration::from_millis(d.u64().map_err(e)?).min(Duration::from_secs(300));
            let records = member.lock().await.poll(max, wire::POLL_BYTES, timeout).await.map_err(|e| e.to_string())?;
            records.iter().fold(ok().u32(records.len() as u32), |enc, r| enc.stream_record(r)).finish()
        }
        kind::STREAM_COMMIT => {
            let member = conn.stream(d.u64().map_err(e)?)?;
            let guard = member.lock().await;
            guard.commit().map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::STREAM_ASSIGNMENT => {
            let assigned = conn.stream(d.u64().map_err(e)?)?.lock().await.assignment();
            assigned.iter().fold(ok().u32(assigned.len() as u32), |enc, p| enc.u32(*p as u32)).finish()
        }
        other => return Err(format!("unknown request kind {other}")),
    }))
}

/// A stored SUCCESS is never overwritten.
pub(crate) fn is_success(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status == TaskState::Success)
}

/// SUCCESS, FAILURE, REVOKED.
pub(crate) fn is_ready(doc: &[u8]) -> bool {
    TaskMeta::from_slice(doc).is_ok_and(|m| m.status.is_ready())
}

/// Accepts connections on the directory's unix socket until the store is dropped.
pub(crate) async fn serve_unix(store: std::sync::Weak<LogStore>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Some(s) = store.upgrade() else { return };
        tokio::spawn(serve_connection(s, stream, None));
    }
}

/// How long a TLS client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections (`broker serve`): `log+tcp://`, or `log+tls://` when `tls` is given.
/// `token`: when set, every client must present it.
pub async fn serve_tcp(
    store: Arc<LogStore>,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    tls: Option<super::ServerTls>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tracing::debug!(%peer, tls = tls.is_some(), "log server: connection");
                let (store, token) = (store.clone(), token.clone());
                match &tls {
                    None => {
                        tokio::spawn(serve_connection(store, stream, token));
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor.clone();
                        tokio::spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => serve_connection(store, stream, token).await,
                                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "log server: TLS handshake failed"),
                                Err(_) => tracing::warn!(%peer, "log server: TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "log server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{partition::tests::tempdir, NewRecord, StoreConfig};

    /// Sends `frame` and returns the next frame the server writes.
    async fn exchange(
        w: &mut (impl tokio::io::AsyncWrite + Unpin),
        r: &mut (impl tokio::io::AsyncRead + Unpin),
        frame: Vec<u8>,
    ) -> wire::Frame {
        use tokio::io::AsyncWriteExt;
        w.write_all(&frame).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), wire::read_frame(r)).await.unwrap().unwrap().unwrap()
    }

    #[tokio::test]
    async fn acks_are_unanswered_applied_in_order_and_bad_ones_are_harmless() {
        let store = LogStore::open(&tempdir(), StoreConfig::default()).unwrap();
        let broker = LogBroker::local(store.clone());
        let rec = || NewRecord { payload: b"{}".to_vec(), ..NewRecord::default() };
        store.append("q", vec![rec(), rec()]).await.unwrap();
        let connect = || {
            let (client, server) = tokio::io::duplex(1 << 16);
            tokio::spawn(serve_connection(store.clone(), server, None));
            tokio::io::split(client)
        };

        let (mut r, mut w) = connect();
        let ok = exchange(&mut w, &mut r, Enc::frame(kind::CONSUME, 1).u32(2).u32(1).str("q").finish()).await;
        assert_eq!((ok.kind, ok.id), (kind::OK, 1));
        let mut deliveries = Vec::new();
        for _ in 0..2 {
            let f = wire::read_frame(&mut r).await.unwrap().unwrap();
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
        let len = exchange(&mut w, &mut r, [acks, Enc::frame(kind::QUEUE_LEN, 7).str("q").finish()].concat()).await;
        assert_eq!((len.kind, len.id), (kind::OK, 7), "the first answer is the queue length's");
        assert_eq!(Dec::new(&len.body).u64().unwrap(), 0, "both records are acked or leased");

        // The connection closes: the unacked delivery (the truncated frame's) comes back, the
        // acked one does not.
        drop((r, w));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while broker.queue_len("q").await.unwrap() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the unacked delivery did not come back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(broker.queue_len("q").await.unwrap(), 1);
    }
}

//! One connection's read loop, from its `HELLO` to its close: the HELLO timeout and the token, the
//! connection's slot, the idle timeout, acks and requests in read order, requests handled each on a
//! task of its own within the connection's limits, and, at the close, what it held returned (its
//! unsettled deliveries go back to their queues at once).

use std::sync::Arc;
use std::time::Duration;

use celery_core::broker::Settle;
use celery_core::sync::lock;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::limits::{take_bytes, Pass, ServerLimits, CLOSING_GRACE, REFUSAL_TIMEOUT};
use super::requests::{ack_all, handle, in_read_order};
use super::session::{Conn, ConnStats, Replies, Reply};
use crate::log::net::wire::{self, kind, Dec, Enc};
use crate::log::storage::consumer::LogSettle;
use crate::log::storage::LogStore;

/// Compares a presented token with the expected one in time that depends only on their lengths
/// (no early exit at the first differing byte).
pub(super) fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    let diff = presented.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    let diff = std::hint::black_box(diff) as usize | (presented.len() ^ expected.len());
    diff == 0
}

/// Serves one connection until it closes. `token`: when set, the client's HELLO must carry it;
/// `stats` counts what the reply queue holds; `pass` (a served socket's): its place among the
/// connections that have not greeted (it is closed when a newer one needs the room first), and
/// the slots of which it takes one when it greets.
pub(super) async fn serve_counted<S>(
    store: Arc<LogStore>,
    stream: S,
    token: Option<String>,
    limits: Arc<ServerLimits>,
    stats: Arc<ConnStats>,
    pass: Option<Pass>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = tokio::io::BufReader::with_capacity(wire::READ_BUFFER, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let budget = Arc::new(Semaphore::new(limits.reply_bytes.max(1)));
    let replies = Replies::new(tx, budget.clone(), limits.reply_bytes, stats);
    let (close, closing) = oneshot::channel::<()>();
    let stall = limits.idle_timeout;
    let writer = tokio::spawn(async move {
        wire::write_frames(wr, rx, Some(stall), async move {
            let _ = closing.await;
        })
        .await;
        // Whatever still waits for room fails: nothing will be written any more.
        budget.close();
    });
    let conn = Arc::new(Conn::default());
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let waits = Arc::new(Semaphore::new(limits.max_waits.max(1)));
    let requests = Arc::new(Semaphore::new(limits.request_bytes.max(1)));
    let answering = |conn: &Conn| {
        in_flight.available_permits() < limits.max_in_flight.max(1)
            || waits.available_permits() < limits.max_waits.max(1)
            || conn.holds_anything()
    };
    let mut greeted = false;
    let mut refused = false;
    // Closing an idle connection: what still arrives is answered `NOT_HANDLED`.
    let mut closing = false;
    let mut deadline = Instant::now() + limits.hello_timeout;
    let (mut ticket, slots) = match pass {
        Some(p) => (Some(p.ticket), Some(p.slots)),
        None => (None, None),
    };
    // This connection's slot among `max_connections`, taken when it greets.
    let mut _slot = None;
    loop {
        let max = if greeted { wire::MAX_FRAME } else { wire::MAX_HELLO_FRAME };
        let read = wire::read_frame(&mut rd, max);
        tokio::pin!(read);
        // The read is never cancelled half-way: at the deadline the connection either closes or
        // keeps the same read going.
        let read = loop {
            tokio::select! {
                biased;
                r = &mut read => break Ok(r),
                _ = async { ticket.as_mut().expect("guarded").evicted().await }, if ticket.is_some() => {
                    break Err("too many connections waiting for HELLO; this was the oldest".to_string());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    if !greeted {
                        break Err(format!("no HELLO within {:?}", limits.hello_timeout));
                    }
                    if closing {
                        break Ok(Ok(None));
                    }
                    if !answering(&conn) {
                        // Said first; then requests already on their way get a while to arrive and
                        // be told they were not handled (the client sends them again elsewhere).
                        let why = format!("closing the connection: idle for {:?}", limits.idle_timeout);
                        tracing::debug!(reason = %why, "log server: closing a connection");
                        replies.send_now(Enc::frame(kind::ERR, 0).str(&why).finish());
                        closing = true;
                        deadline = Instant::now() + CLOSING_GRACE;
                        continue;
                    }
                    deadline = Instant::now() + limits.idle_timeout;
                }
            }
        };
        let frame = match read {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => break,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(error = %e, "log server: closing a connection");
                replies.send_now(Enc::frame(kind::ERR, 0).str(&e.to_string()).finish());
                refused = true;
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "log server: connection failed");
                break;
            }
            Err(why) => {
                tracing::debug!(reason = %why, "log server: closing a connection");
                replies.send_now(Enc::frame(kind::ERR, 0).str(&format!("closing the connection: {why}")).finish());
                refused = true;
                break;
            }
        };
        if closing {
            if frame.kind != kind::ACK
                && replies.send(Enc::frame(kind::ERR, frame.id).str(wire::NOT_HANDLED).finish()).await.is_err()
            {
                break;
            }
            continue;
        }
        if greeted {
            deadline = Instant::now() + limits.idle_timeout;
        } else {
            let accepted = frame.kind == kind::HELLO
                && token
                    .as_deref()
                    .is_none_or(|t| Dec::new(&frame.body).bytes().is_ok_and(|got| tokens_match(got, t.as_bytes())));
            if !accepted {
                let why = match token {
                    Some(_) => "authentication failed: wrong or missing token",
                    None => "the first frame must be HELLO",
                };
                replies.send_now(Enc::frame(kind::ERR, frame.id).str(why).finish());
                refused = true;
                break;
            }
            if let Some(slots) = &slots {
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => _slot = Some(slot),
                    Err(_) => {
                        tracing::warn!(
                            limit = limits.max_connections,
                            "log server: too many connections; refusing one"
                        );
                        let why = format!("too many connections (limit {})", limits.max_connections);
                        replies.send_now(Enc::frame(kind::ERR, 0).str(&why).finish());
                        refused = true;
                        break;
                    }
                }
            }
            greeted = true;
            ticket = None;
            deadline = Instant::now() + limits.idle_timeout;
            if replies.send(Enc::frame(kind::OK, frame.id).finish()).await.is_err() {
                break;
            }
            continue;
        }
        if frame.kind == kind::ACK {
            ack_all(&conn, &frame.body);
            continue;
        }
        if let Some(reply) = in_read_order(&conn, &frame) {
            if replies.send(reply).await.is_err() {
                break;
            }
            continue;
        }
        // At a limit the read loop waits here: the client's further requests stay in its socket.
        let slots = if matches!(frame.kind, kind::RESULT_WAIT | kind::STREAM_POLL) { &waits } else { &in_flight };
        let (Ok(slot), Some(bytes)) =
            (slots.clone().acquire_owned().await, take_bytes(&requests, limits.request_bytes, frame.body.len()).await)
        else {
            break;
        };
        let (store, conn, replies) = (store.clone(), conn.clone(), replies.clone());
        tokio::spawn(async move {
            let id = frame.id;
            let reply = match handle(&store, &conn, &replies, frame).await {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(e) => Enc::frame(kind::ERR, id).str(&e).finish(),
            };
            drop(bytes);
            let _ = replies.send(reply).await;
            drop(slot);
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
    // The writer writes what is queued (a refusal) and shuts the stream; a peer that reads nothing
    // does not keep it.
    let _ = close.send(());
    let mut writer = writer;
    if tokio::time::timeout(REFUSAL_TIMEOUT, &mut writer).await.is_err() {
        writer.abort();
    }
    if refused || closing {
        drain(&mut rd).await;
    }
}

/// Reads and drops what the peer still sends (at most 64 KiB, for at most a second) after a
/// refusal: a socket closed with unread input is reset, and a reset can discard the refusal
/// before the peer reads it.
async fn drain<R: AsyncRead + Unpin>(r: &mut R) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < (64 << 10) {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

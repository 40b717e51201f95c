//! The requests of a greeted connection and their answers (the table in `DESIGN.md`): those
//! answered in read order (acks, requeues, stopping a consumer, leaving a stream group), and the
//! others, each handled on a task of its own, over the store.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use celery_core::broker::Settle;
use celery_core::flow::{FairnessWeight, FairnessWeights, MAX_FAIRNESS_WEIGHTS};
use celery_core::sync::lock;

use super::limits::MAX_RESULT_WAIT;
use super::session::{Conn, Replies};
use crate::log::net::wire::{self, kind, settle, Dec, Enc};
use crate::log::storage::consumer::LogConsumer;
use crate::log::storage::results::{is_ready, is_success};
use crate::log::storage::{payload, Commit, LogStore, NewRecord, StartFrom};

/// Applies an `ACK` frame (count:u32, delivery:u64*) in read order. It has no answer: what cannot
/// be acked (a malformed frame, wholly; a delivery this connection does not hold) is logged, and
/// the record stays leased until the connection closes, when it goes back to its queue.
pub(super) fn ack_all(conn: &Conn, body: &[u8]) {
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
pub(super) fn in_read_order(conn: &Conn, frame: &wire::Frame) -> Option<Vec<u8>> {
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

pub(super) async fn handle(
    store: &Arc<LogStore>,
    conn: &Arc<Conn>,
    replies: &Replies,
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
            if n > wire::MAX_PUBLISH_RECORDS {
                return Err(format!("{n} records in one PUBLISH (at most {})", wire::MAX_PUBLISH_RECORDS));
            }
            // Each record takes at least 16 bytes of the frame.
            let mut records = Vec::with_capacity(n.min(frame.body.len() / 16));
            for _ in 0..n {
                let not_before_ms = d.i64().map_err(e)?;
                let key = d.bytes().map_err(e)?.to_vec();
                let payload = d.bytes().map_err(e)?.to_vec();
                records.push(NewRecord { not_before_ms, headers: Vec::new(), key, payload });
            }
            store.append(&queue, records).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::CONSUME => {
            conn.room_for_subscription()?;
            let prefetch = d.u32().map_err(e)? as usize;
            let n = d.u32().map_err(e)? as usize;
            let queues = (0..n.min(1024)).map(|_| d.str()).collect::<Result<Vec<_>, _>>().map_err(e)?;
            let weights = if d.at_end() {
                FairnessWeights::default()
            } else {
                let n = d.u32().map_err(e)? as usize;
                if n > MAX_FAIRNESS_WEIGHTS {
                    return Err(format!("{n} fairness weights in one CONSUME (at most {MAX_FAIRNESS_WEIGHTS})"));
                }
                let list = (0..n)
                    .map(|_| d.str().map_err(e)?.parse::<FairnessWeight>().map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                FairnessWeights::new(list).map_err(|e| e.to_string())?
            };
            let mut consumer = LogConsumer::new(store.clone(), &queues, prefetch)
                .map_err(|e| e.to_string())?
                .with_fairness(Arc::new(weights));
            let (conn2, tx2) = (conn.clone(), replies.clone());
            let task = tokio::spawn(async move {
                while let Some(s) = consumer.next_raw().await {
                    let delivery = conn2.next_delivery.fetch_add(1, Ordering::Relaxed);
                    let frame = Enc::frame(kind::DELIVERY, id)
                        .u64(delivery)
                        .str(&s.queue)
                        .u32(s.deliveries)
                        .bytes(&s.record.payload)
                        .finish();
                    lock(&conn2.held).insert(delivery, s);
                    if tx2.send(frame).await.is_err() {
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
                settle::DEFER => match payload::decode(&data).0 {
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
            ok().u64(store.purge(&q).map_err(|e| e.to_string())?).finish()
        }
        kind::PEEK => {
            let queue = d.str().map_err(e)?;
            let max = d.u32().map_err(e)? as usize;
            let found = store.peek(&queue, max).map_err(|e| e.to_string())?;
            found.iter().fold(ok().u32(found.len() as u32), |enc, p| enc.bytes(p)).finish()
        }
        kind::FLOW => {
            let op = d.u8().map_err(e)?;
            let key = d.str().map_err(e)?;
            let holder = d.str().map_err(e)?;
            match op {
                wire::flow::ACQUIRE => {
                    let limit = d.u32().map_err(e)?;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    let queue = d.str().map_err(e)?;
                    let rec_key = d.bytes().map_err(e)?.to_vec();
                    let payload = d.bytes().map_err(e)?.to_vec();
                    let req = celery_core::flow::SlotRequest { key: &key, limit, holder: &holder, ttl };
                    let rec = NewRecord { key: rec_key, payload, ..NewRecord::default() };
                    let got = store.acquire_or_park(&req, &queue, || rec).await.map_err(|e| e.to_string())?;
                    ok().u8((got == celery_core::flow::Admission::Acquired) as u8).finish()
                }
                wire::flow::RENEW => {
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    ok().u8(store.renew_slot(&key, &holder, ttl).map_err(|e| e.to_string())? as u8).finish()
                }
                wire::flow::RELEASE => {
                    store.release_slot(&key, &holder).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                wire::flow::RATE => {
                    let interval = Duration::from_micros(d.u64().map_err(e)?);
                    let wait = store.reserve_start(&key, interval).map_err(|e| e.to_string())?;
                    ok().u64(wait.as_micros() as u64).finish()
                }
                other => return Err(format!("unknown key slot operation {other}")),
            }
        }
        kind::QUEUE_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(store.queue_len(&q).map_err(|e| e.to_string())?).finish()
        }
        kind::DELAYED_LEN => {
            let q = d.str().map_err(e)?;
            ok().u64(store.delayed_len(&q).map_err(|e| e.to_string())?).finish()
        }
        kind::HISTORY => {
            let op = d.u8().map_err(e)?;
            match op {
                wire::history::RECORD => {
                    let retention = Duration::from_millis(d.u64().map_err(e)?);
                    let max_tasks = usize::try_from(d.u64().map_err(e)?).unwrap_or(usize::MAX);
                    let tasks: Vec<celery_core::history::TaskRecord> =
                        serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| format!("history records: {e}"))?;
                    let keep = celery_core::history::Retain { retention, max_tasks };
                    store.results().record_history(&tasks, &keep).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                wire::history::SEARCH => {
                    let query: celery_core::history::HistoryQuery =
                        serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| format!("history query: {e}"))?;
                    query.check()?;
                    let page = store.results().search_history(&query);
                    let json = serde_json::to_vec(&page).map_err(|e| format!("history page: {e}"))?;
                    ok().bytes(&json).finish()
                }
                other => return Err(format!("unknown history operation {other}")),
            }
        }
        kind::RESULT_PUT => {
            let rid = d.str().map_err(e)?;
            let doc = d.bytes().map_err(e)?.to_vec();
            let ttl = Duration::from_millis(d.u64().map_err(e)?);
            let stored =
                store.results().put(&rid, doc, ttl, is_success).await.map_err(|e| wire::result_put_error(&e))?;
            ok().u8(stored as u8).finish()
        }
        kind::RESULT_GET | kind::RESULT_WAIT => {
            let rid = d.str().map_err(e)?;
            if frame.kind == kind::RESULT_WAIT {
                let timeout = Duration::from_millis(d.u64().map_err(e)?).min(MAX_RESULT_WAIT);
                // The document is fetched again below, in turn: many waits ending at once do not
                // each hold a copy while their answers wait for room.
                drop(store.results().wait(&rid, timeout, is_ready).await);
            }
            let _ = replies.send_built(|| ok().opt_bytes(store.results().get(&rid).as_deref()).finish()).await;
            return Ok(None);
        }
        kind::RESULT_FORGET => {
            let rid = d.str().map_err(e)?;
            store.results().forget(&rid).await.map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::LEASE => {
            let name = d.str().map_err(e)?;
            let holder = d.str().map_err(e)?;
            let ttl = Some(Duration::from_millis(d.u64().map_err(e)?)).filter(|t| !t.is_zero());
            let held = store.results().lease(&name, &holder, ttl).await.map_err(|e| e.to_string())?;
            ok().u64(held as u64).finish()
        }
        kind::BROADCAST => {
            let exchange = d.str().map_err(e)?;
            let routing_key = d.str().map_err(e)?;
            store.broadcast(&exchange, &routing_key, d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
            ok().finish()
        }
        kind::SUBSCRIBE => {
            conn.room_for_subscription()?;
            let exchange = d.str().map_err(e)?;
            let pattern = d.str().map_err(e)?;
            let mut rx = store.subscribe(&exchange, &pattern).map_err(|e| e.to_string())?;
            let tx2 = replies.clone();
            let task = tokio::spawn(async move {
                while let Some(b) = rx.recv().await {
                    let frame =
                        Enc::frame(kind::DELIVERY, id).u64(0).str(&b.routing_key).u32(0).bytes(&b.body).finish();
                    if tx2.send(frame).await.is_err() {
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
                    store.results().chord_size(&group, size, ttl).await.map_err(|e| e.to_string())?;
                    ok().finish()
                }
                wire::chord::PART => {
                    let member: celery_core::backend::ChordMember =
                        serde_json::from_slice(d.bytes().map_err(e)?).map_err(|e| e.to_string())?;
                    let ttl = Duration::from_millis(d.u64().map_err(e)?);
                    let all = store.results().chord_part(&group, member, ttl).await.map_err(|e| e.to_string())?;
                    let doc = all.map(|a| serde_json::to_vec(&a)).transpose().map_err(|e| e.to_string())?;
                    ok().opt_bytes(doc.as_deref()).finish()
                }
                wire::chord::DONE => {
                    store.results().chord_done(&group).await.map_err(|e| e.to_string())?;
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
            conn.room_for_subscription()?;
            let group = d.str().map_err(e)?;
            let queue = d.str().map_err(e)?;
            let start = if d.u8().map_err(e)? == 0 { StartFrom::Earliest } else { StartFrom::Latest };
            let commit = if d.u8().map_err(e)? == 0 { Commit::AfterProcessing } else { Commit::BeforeProcessing };
            let member = store.join_stream(&group, &queue, start, commit).map_err(|e| e.to_string())?;
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

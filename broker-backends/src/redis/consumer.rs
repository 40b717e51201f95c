//! The reliable Redis consumer: the leased fetch (a Lua script that takes envelopes and records
//! each in Kombu's `unacked` hash in one step), the wait for new messages, and the background
//! loops: lease renewal, restore of leases past the visibility timeout (the heartbeat sweep in
//! [`super::holder`] restores a dead worker of ours sooner), and promotion of due ETA messages. The
//! shell (prefetch, reconnect pauses, batched acks, close) is [`crate::consumer`]'s; settling is in
//! [`super::settle`]. Up to [`FETCHES_IN_FLIGHT`] fetches are on their way at once, and each
//! reply is decoded into deliveries by a task of its own ([`decode_loop`]), so Redis has the next
//! request queued when it finishes one and never waits for the worker to parse what it sent.
//!
//! On a cluster each fetch script takes from one queue shard (a slot), so a fetch is a *round*:
//! the scripts of up to [`CLUSTER_GROUPS_PER_ROUND`] hot shards sent at once, the round's slots
//! split among them ([`shares`]), each reply decoded as above; up to [`CLUSTER_FETCHES_IN_FLIGHT`]
//! rounds are on their way, and a round that waited for its place takes the slots freed
//! meanwhile. The holder's heartbeat in a shard is set by the first fetch script there itself
//! ([`super::holder::RedisBeat::activation`]), not by a round trip before it.
//!
//! What an idle consumer costs does not grow with its queues:
//! - The fetch runs only on the queues marked hot ([`super::wake`]): by a wake-up our producers
//!   publish, by the probe, or by a fetch that filled its request. An idle consumer waits on its
//!   one subscriber connection. The probe finds what Python producers sent (they publish no
//!   wake-up): on one server one `EXISTS` per [`PROBE_ENTRIES`] queues, every [`PROBE_STEP`] per
//!   such batch of queues (100 ms for up to 1,024 queues, a second for 10,240), so it costs about
//!   10 commands a second whatever the count; on a cluster (where Python
//!   Celery does not go; the probe is a safety net there) [`PROBE_CLUSTER_ENTRIES`] queue shards
//!   per [`PROBE_EVERY`] in turn.
//! - Due ETA messages are found through one next-due index ([`super::keys::Keys::due`]): the
//!   defer writes the queue's earliest due time into it (`ZADD LT`), the mover reads it once per
//!   wait ([`scripts::due`]) and moves only the due queues, sleeping until the next due time (at
//!   most [`PROMOTE_CAP`]). A slow sweep ([`SWEEP_EVERY`]) puts delayed sets the index misses back
//!   into it.
//! - On a cluster, where each queue (shard) is a slot and a scope of its own, the holder's
//!   heartbeat and sweep cost one script a tick in the holders' slot ([`super::holder`]): the
//!   fetch sets its heartbeat in a scope first, and it is kept there only while deliveries are
//!   held; the visibility-timeout restore takes one scope at a time, at most
//!   [`RESTORE_CLUSTER_PER_SECOND`] a second ([`restore_pace`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use celery_core::broker::{dead_letter_queue, Settled};
use celery_core::flow::FairnessWeights;
use celery_core::protocol::lenient_task_id;
use celery_core::sync::lock;
use celery_core::{BrokerError, Delivery, ProtocolError};
use futures::{StreamExt, TryStreamExt};
use redis::Script;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::connection::RedisConn;
use super::error::{broker_error, failed};
use super::holder::Holder;
use super::keys::{Keys, Scope};
use super::settle::RedisSettle;
use super::wake::{self, Wakes};
use super::{scripts, RedisOptions};
use crate::consumer::{ack_queue, AckQueue, Fetch, Fetched, FetchingConsumer, Slots};
use crate::envelope;

/// A consumer of some Redis queues: an ack carries the delivery's tag and its [`Group`].
pub type RedisConsumer = FetchingConsumer<Acked>;

/// What an ack names: the delivery's tag in its scope's `unacked` hash.
#[derive(Debug)]
pub struct Acked {
    tag: LeaseTag,
    group: usize,
}

impl Acked {
    pub(super) fn new(tag: LeaseTag, group: usize) -> Acked {
        Acked { tag, group }
    }
}

/// The tag of one lease in `unacked`: its consumer's prefix and a sequence number, which the fetch
/// script writes as `<prefix><seq>`. Kept as the two parts, so a lease costs no string of its own:
/// the text is written straight into a command's buffer when one names it ([`redis::ToRedisArgs`])
/// and hashed as the number. Equal when both parts are.
#[derive(Debug, Clone)]
pub(super) struct LeaseTag {
    prefix: Arc<str>,
    seq: u64,
}

impl LeaseTag {
    /// The tag `<prefix><seq>`.
    pub(super) fn new(prefix: Arc<str>, seq: u64) -> LeaseTag {
        LeaseTag { prefix, seq }
    }
}

impl PartialEq for LeaseTag {
    fn eq(&self, other: &LeaseTag) -> bool {
        self.seq == other.seq && (Arc::ptr_eq(&self.prefix, &other.prefix) || self.prefix == other.prefix)
    }
}

impl Eq for LeaseTag {}

impl std::hash::Hash for LeaseTag {
    /// The number alone: tags that differ only by their prefix are rare (a consumer takes a new
    /// prefix after [`MAX_TAG_SEQ`] leases) and told apart by `eq`.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.seq.hash(state);
    }
}

impl std::fmt::Display for LeaseTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.prefix, self.seq)
    }
}

/// One argument.
impl redis::ToSingleRedisArg for LeaseTag {}

impl redis::ToRedisArgs for LeaseTag {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        // The digits by hand (`write!` would go through the formatting machinery for every tag),
        // then both parts into the command's own buffer, as one argument: writing to it cannot fail.
        let mut digits = [0u8; 20];
        let (mut at, mut n) = (digits.len(), self.seq);
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let mut arg = out.writer_for_next_arg();
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(&digits[at..]);
    }
}

/// How many envelopes one fetch may take at most. Measured (`demo bench -n 200000`, release, quiet
/// machine, 2026-12-02): with the reply decoded beside the next fetch, 128 drains about 1.15x
/// faster than 64 at the same or lower CPU per task; one script call then holds Redis about 1 ms.
const MAX_FETCH: usize = 128;
/// Hot queues one fetch script takes from at most (the next fetch takes from the next ones), so
/// that a fetch over thousands of queues with work does not pass all their lists each time.
const MAX_FETCH_QUEUES: usize = 64;
/// How many acks one round trip carries at most.
const MAX_ACK_BATCH: usize = 2048;
/// Groups (queue shards on a cluster) an ack batch settles at once, each its own `MULTI`.
const ACK_GROUPS_AT_ONCE: usize = 32;
/// Lease renewals (one `ZADD` per group and 1000 leases) on their way at once.
const RENEWALS_AT_ONCE: usize = 32;
/// Rounds of one restore sweep at most (each examines up to 1000 leases).
const RESTORE_ROUNDS: usize = 100;
/// On a cluster, how often [`PROBE_CLUSTER_ENTRIES`] queue shards are probed for messages no
/// wake-up announced.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The probe interval per [`PROBE_ENTRIES`] queues on one server (a Python-sent message to a
/// worker of up to 1,024 queues waits at most this long).
const PROBE_STEP: Duration = Duration::from_millis(100);

/// How often a consumer of `entries` queue shards probes them: [`PROBE_STEP`] per `EXISTS` batch
/// on one server (about ten `EXISTS` a second at any count); [`PROBE_EVERY`] on a cluster.
fn probe_every(entries: usize, cluster: bool) -> Duration {
    if cluster {
        return PROBE_EVERY;
    }
    let batches = u32::try_from(entries.div_ceil(PROBE_ENTRIES).max(1)).unwrap_or(u32::MAX);
    PROBE_STEP.saturating_mul(batches)
}
/// Queues whose buckets one `EXISTS` probes (one server).
const PROBE_ENTRIES: usize = 1024;
/// Queue shards probed per [`PROBE_EVERY`] on a cluster (one `EXISTS` each, in turn).
const PROBE_CLUSTER_ENTRIES: usize = 8;
/// The longest the delayed mover sleeps between two reads of the next-due index.
const PROMOTE_CAP: Duration = Duration::from_secs(1);
/// Due members one read of the next-due index returns at most.
const DUE_LIMIT: usize = 1000;
/// How often the delayed sets are swept for what the next-due index misses (one server: an
/// `EXISTS` per [`SWEEP_BATCH`] queues, then a script on the batches that hold any; a cluster:
/// [`PROBE_CLUSTER_ENTRIES`] queue shards per sweep).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Delayed sets one sweep `EXISTS` (and, when any exists, one sweep script) looks at.
const SWEEP_BATCH: usize = 1024;

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The queues (and shards) of one [`Scope`]: what one fetch script takes from. On one server
/// every queue is in the one group; on a cluster each queue shard (with its dead-letter queues)
/// has its own, in its own slot.
#[derive(Debug)]
pub(super) struct Group {
    pub(super) scope: Scope,
    /// The holder's `held` set in this scope.
    pub(super) held: String,
    /// Its entries in [`Shared::entries`], in the order given.
    entries: Vec<usize>,
    /// The (queue, shard) pairs, in the order given.
    pub(super) queues: Vec<(String, u16)>,
}

/// One (queue, shard) consumed.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) queue: String,
    pub(super) shard: u16,
    /// Its priority buckets, in the order they are taken from.
    pub(super) buckets: [String; 4],
    /// The bucket its dead letters go to.
    dead: String,
}

/// The groups of `queues` (every shard of each), in the order given.
pub(super) fn groups_of(keys: &Keys, queues: &[String]) -> Vec<(Scope, Vec<(String, u16)>)> {
    let mut out: Vec<(Scope, Vec<(String, u16)>)> = Vec::new();
    for q in queues {
        for shard in 0..keys.shards() {
            let scope = keys.scope(q, shard);
            match out.iter_mut().find(|(s, _)| *s == scope) {
                Some((_, qs)) => qs.push((q.clone(), shard)),
                None => out.push((scope, vec![(q.clone(), shard)])),
            }
        }
    }
    out
}

/// What the fetcher, the settlers and the background loops share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) conn: RedisConn,
    pub(super) keys: Keys,
    /// The unsettled deliveries (renewed until settled): tag -> group.
    leases: Mutex<HashMap<LeaseTag, usize>>,
    slots: Slots,
    pub(super) acks: AckQueue<Acked>,
    /// Whose heartbeat vouches for these leases (see [`super::holder`]).
    pub(super) holder: Arc<Holder>,
    pub(super) groups: Vec<Group>,
    /// Every (queue, shard) consumed.
    pub(super) entries: Vec<Entry>,
    /// Which entries may hold messages.
    wakes: Arc<Wakes>,
}

impl Shared {
    /// Forgets the lease `tag` and frees its prefetch slot.
    pub(super) fn release(&self, tag: &LeaseTag) {
        if let Some(g) = lock(&self.leases).remove(tag) {
            self.holder.broker().unhold(&self.groups[g].scope);
        }
        self.slots.give_back(1);
    }

    /// The unsettled tags, per group.
    fn lease_snapshot(&self) -> Vec<Vec<LeaseTag>> {
        let mut per = vec![Vec::new(); self.groups.len()];
        for (tag, g) in lock(&self.leases).iter() {
            per[*g].push(tag.clone());
        }
        per
    }
}

impl Drop for Shared {
    /// What is still leased here is no longer this consumer's to keep: the holder stops keeping
    /// its heartbeat in their scopes for them.
    fn drop(&mut self) {
        let leases = std::mem::take(&mut *lock(&self.leases));
        for g in leases.into_values() {
            self.holder.broker().unhold(&self.groups[g].scope);
        }
    }
}

impl RedisConsumer {
    /// Starts consuming `queues` (priority first across the queues of one fetch, up to
    /// [`MAX_FETCH_QUEUES`] of those with messages, then queue order; the next fetch goes on with
    /// the next ones; on a cluster the shards are taken from in turn).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(
        conn: RedisConn,
        keys: Keys,
        holder: Arc<Holder>,
        options: &RedisOptions,
        queues: &[String],
        prefetch: usize,
        max_message_size: usize,
        weights: Arc<FairnessWeights>,
    ) -> RedisConsumer {
        let prefetch = prefetch.max(1);
        let (acks, batcher) = ack_queue();
        let mut entries = Vec::new();
        let mut groups = Vec::new();
        for (scope, queues) in groups_of(&keys, queues) {
            let mut mine = Vec::with_capacity(queues.len());
            for (q, shard) in &queues {
                mine.push(entries.len());
                entries.push(Entry {
                    queue: q.clone(),
                    shard: *shard,
                    buckets: keys.buckets(q, *shard),
                    dead: keys.bucket(&dead_letter_queue(q), *shard, 0),
                });
            }
            groups.push(Group { held: scope.held(holder.id()), scope, entries: mine, queues });
        }
        let mut channels: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            channels.entry(keys.wake(&e.queue, e.shard)).or_default().push(i);
        }
        let all = (!keys.is_cluster()).then(|| keys.wake_all());
        let wakes = Arc::new(Wakes::new(entries.len()));
        let shared = Arc::new(Shared {
            conn: conn.clone(),
            keys: keys.clone(),
            leases: Mutex::new(HashMap::new()),
            slots: Slots::new(prefetch),
            acks: acks.clone(),
            holder,
            groups,
            entries,
            wakes: wakes.clone(),
        });
        let fetch = RedisFetch {
            shared: shared.clone(),
            script: scripts::fetch(),
            tag_prefix: new_tag_prefix(),
            seq: 0,
            next_group: 0,
            conn: conn.clone(),
            max_message_size,
            next_probe: Instant::now() + probe_every(shared.entries.len(), shared.keys.is_cluster()),
            probe_every: probe_every(shared.entries.len(), shared.keys.is_cluster()),
            probe_from: 0,
            next_entry: vec![0; shared.groups.len()],
            weights,
            decoder: None,
            in_flight: Arc::new(Semaphore::new(fetches_in_flight(shared.keys.is_cluster()))),
            max_in_flight: fetches_in_flight(shared.keys.is_cluster()),
            replies: Arc::new(Replies::default()),
            last: Vec::new(),
        };
        let vt = options.visibility_timeout;
        let ack_shared = shared.clone();
        // Acks are retried whatever failed: a batch is only given up when the consumer is dropped.
        let ack = batcher.run(
            "redis",
            MAX_ACK_BATCH,
            |_| true,
            move |acked: &[Acked]| {
                // One MULTI per group (one slot each on a cluster; the one group on a server).
                let mut per: Vec<Vec<&LeaseTag>> = vec![Vec::new(); ack_shared.groups.len()];
                for a in acked {
                    per[a.group].push(&a.tag);
                }
                let mut pipes = Vec::new();
                for (g, tags) in ack_shared.groups.iter().zip(per).filter(|(_, t)| !t.is_empty()) {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .hdel(g.scope.unacked(), &tags)
                        .ignore()
                        .zrem(g.scope.unacked_index(), &tags)
                        .ignore()
                        .srem(&g.held, &tags)
                        .ignore();
                    pipes.push(pipe);
                }
                let conn = ack_shared.conn.clone();
                // Several groups at once: acks spread over a thousand queue shards would otherwise
                // wait a round trip per shard, one after another, and bound the drain.
                async move {
                    futures::stream::iter(pipes)
                        .map(|pipe| {
                            let mut conn = conn.clone();
                            async move { pipe.query_async::<()>(&mut conn).await.map_err(failed("redis: ack")) }
                        })
                        .buffer_unordered(ACK_GROUPS_AT_ONCE)
                        .try_collect::<()>()
                        .await
                }
            },
        );
        let background = vec![
            tokio::spawn(ack),
            tokio::spawn(renew_loop(shared.clone(), vt)),
            tokio::spawn(restore_loop(shared.clone(), vt)),
            tokio::spawn(promote_loop(shared.clone())),
            tokio::spawn(wake::listen(conn, channels, all, wakes)),
        ];
        FetchingConsumer::spawn(prefetch, fetch, acks, background)
    }
}

/// The Redis part of the fetcher: the fetch script over the bucket lists of each group.
struct RedisFetch {
    shared: Arc<Shared>,
    script: Script,
    tag_prefix: Arc<str>,
    /// The sequence number of the next tag (below [`MAX_TAG_SEQ`]).
    seq: u64,
    /// The group the next fetch starts with (turns, so that every shard is served).
    next_group: usize,
    conn: RedisConn,
    max_message_size: usize,
    /// When the lists are probed next.
    next_probe: Instant,
    /// How often ([`probe_every`]).
    probe_every: Duration,
    /// On a cluster, the entry the next probe starts with.
    probe_from: usize,
    /// Per group, the position in its entries the next fetch looks from.
    next_entry: Vec<usize>,
    /// The weights of fairness keys when they take turns.
    weights: Arc<FairnessWeights>,
    /// Where each fetch sent goes, in the order sent, to have its reply decoded ([`decode_loop`],
    /// started by the first fetch), so that the next fetch is on its way while Redis runs this one
    /// and the worker decodes the one before. Unbounded in type only: at most the fetches of
    /// [`fetches_in_flight`] rounds wait there (on a cluster up to [`CLUSTER_GROUPS_PER_ROUND`]
    /// each), and what they take keeps prefetch slots.
    decoder: Option<mpsc::UnboundedSender<Pending>>,
    /// One permit per fetch round sent whose replies are not all in ([`fetches_in_flight`]).
    in_flight: Arc<Semaphore>,
    /// The permits of `in_flight` in all.
    max_in_flight: usize,
    /// What the replies said.
    replies: Arc<Replies>,
    /// The groups and queues of the last fetch round sent: fetched again while replies fill their
    /// requests (their marks were cleared when it was sent; a full reply marks them again).
    last: Vec<(usize, Vec<usize>)>,
}

/// A fresh prefix for the tags of one consumer's leases (`<uuid>.`).
fn new_tag_prefix() -> Arc<str> {
    format!("{}.", uuid::Uuid::new_v4().simple()).into()
}

/// Past this sequence number a consumer takes a new tag prefix and starts again from 0: Lua
/// writes a number of 10^14 or more in exponent form (`1e+14`), so the script's tags and those
/// the decoder derives would differ.
const MAX_TAG_SEQ: u64 = 10_000_000_000_000;

/// How many fetch scripts may be on their way at once: while Redis runs one, the next are queued
/// behind it on the connection, so Redis never waits for the worker to ask again, also while the
/// worker's runtime thread is busy running a batch before the fetch loop's turn comes. Measured
/// (release `demo bench -n 1000000 --roundtrips 0` on a private redis-server, one runtime thread,
/// 2026-12-04, three alternations): 2 drained 130,000-134,000 tasks/s, 3 145,000-147,000, 4
/// 149,000-156,000, at the same CPU per task on both sides.
const FETCHES_IN_FLIGHT: usize = 4;

/// Fetch rounds on their way at once on a cluster, where a round sends one script per queue shard
/// it takes from (a slot, on any of the masters). Fewer rounds, each larger, cost Redis less per
/// task than many small ones: a round waiting for its place gathers the slots freed meanwhile.
/// Measured (release, `demo bench -n 20000 --queues 1000 -c 64`, 2026-12-03, load 4.5-5): 4
/// rounds drained 26,000-29,400 tasks/s at 36-39 us of Redis CPU per task, 8 rounds of 8-slot
/// shares 16,000-21,300 at 48-49 us, 2 rounds 17,000-22,800.
const CLUSTER_FETCHES_IN_FLIGHT: usize = 4;

/// On a cluster, the queue shards (groups) one fetch round takes from at most: their scripts are
/// sent together (each to its shard's master, written to the node's connection side by side) and
/// the round's slots are split among them, so that with work spread over many shards one round
/// trip brings the messages of many shards instead of one.
const CLUSTER_GROUPS_PER_ROUND: usize = 16;

/// The fewest slots a group's script in a round of several is given: a round of `n` slots takes
/// from at most `n / MIN_GROUP_SHARE` groups (a group that fills its share is marked hot again
/// and fetched in a later round). Smaller shares mean more scripts per task.
const MIN_GROUP_SHARE: usize = 16;

/// How many groups a fetch round of `n` slots takes from at most: one on one server (its one
/// group); on a cluster one per [`MIN_GROUP_SHARE`] slots, at most [`CLUSTER_GROUPS_PER_ROUND`].
fn groups_per_round(n: usize, cluster: bool) -> usize {
    if !cluster {
        return 1;
    }
    (n / MIN_GROUP_SHARE).clamp(1, CLUSTER_GROUPS_PER_ROUND)
}

/// The most slots one fetch round takes on a cluster (each of its fetches at most [`MAX_FETCH`]).
const CLUSTER_ROUND_MAX: usize = CLUSTER_GROUPS_PER_ROUND * MAX_FETCH;

/// The slots of each of `k` fetches of a round of `n`: as even as can be, the first ones one more.
fn shares(n: usize, k: usize) -> impl Iterator<Item = usize> {
    let k = k.max(1);
    (0..k).map(move |i| n / k + usize::from(i < n % k))
}

/// [`FETCHES_IN_FLIGHT`], or [`CLUSTER_FETCHES_IN_FLIGHT`] on a cluster.
fn fetches_in_flight(cluster: bool) -> usize {
    if cluster {
        CLUSTER_FETCHES_IN_FLIGHT
    } else {
        FETCHES_IN_FLIGHT
    }
}

/// What the decoder tells the fetcher about the replies.
#[derive(Debug, Default)]
struct Replies {
    /// The last reply filled its request: its queues likely hold more.
    full: AtomicBool,
    /// Why a fetch failed: the fetcher reports it (and pauses) at its next call.
    failed: Mutex<Option<BrokerError>>,
}

/// One fetch sent, on its way to [`decode_loop`]: its group, the holder's epoch read before the
/// fetch, the tag prefix and first sequence number of its leases, the lists it takes from as
/// (entry, bucket step) in the script's order, the hot queues it was sent for, the slots it
/// holds, its reply (see [`scripts::fetch`]) and, with the last fetch of a round, the round's
/// place among the rounds in flight.
struct Pending {
    group: usize,
    epoch: u64,
    prefix: Arc<str>,
    seq: u64,
    lists: Vec<(usize, usize)>,
    hot: Vec<usize>,
    want: usize,
    reply: JoinHandle<Result<Vec<redis::Value>, BrokerError>>,
    permit: Option<OwnedSemaphorePermit>,
}

/// Waits for each fetch's reply in the order sent, gives back the slots it did not use, marks
/// its queues hot again when it filled its request, and decodes the envelopes into deliveries,
/// in the order fetched, until the fetcher is gone (after the fetches it sent are delivered) or
/// nobody receives deliveries any more. A failed fetch gives back its slots, marks its queues hot
/// and leaves its error to the fetcher; a reply item that cannot be read gives its slot back.
async fn decode_loop(
    shared: Arc<Shared>,
    replies: Arc<Replies>,
    max_message_size: usize,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    tx: mpsc::Sender<Delivery>,
) {
    while let Some(pending) = rx.recv().await {
        let Pending { group: g, epoch, prefix, seq, lists, hot, want, reply, permit } = pending;
        let reply = match reply.await {
            Ok(reply) => reply,
            Err(e) => Err(BrokerError::operation_with("redis: fetch task", e)),
        };
        let items = match reply {
            Ok(items) => items,
            Err(error) => {
                shared.slots.give_back(want);
                replies.full.store(false, Ordering::Relaxed);
                *lock(&replies.failed) = Some(error);
                shared.wakes.mark(hot);
                continue;
            }
        };
        drop(permit);
        // Leased: (list index, envelope); dead-lettered: (list index, size, id), holding no lease
        // nor prefetch slot. An item that is neither ends the reading (the leases of what follows
        // are restored after the visibility timeout).
        let mut taken: Vec<(usize, redis::Value, Option<redis::Value>)> = Vec::with_capacity(items.len() / 2);
        let mut items = items.into_iter();
        while let (Some(i), Some(v)) = (items.next(), items.next()) {
            let i = redis::from_redis_value_ref::<usize>(&i).unwrap_or(0).min(lists.len() - 1);
            match v {
                redis::Value::BulkString(_) => taken.push((i, v, None)),
                redis::Value::Int(_) => {
                    let id = items.next();
                    taken.push((i, v, id));
                }
                _ => {
                    tracing::error!("redis: fetch script returned an unexpected reply");
                    break;
                }
            }
        }
        let got = taken.iter().filter(|(_, v, _)| matches!(v, redis::Value::BulkString(_))).count();
        shared.slots.give_back(want.saturating_sub(got));
        if got == 0 {
            shared.holder.broker().idle(&shared.groups[g].scope);
        }
        replies.full.store(got >= want, Ordering::Relaxed);
        if got >= want {
            shared.wakes.mark(hot);
        }
        // The leases, under one lock, before any delivery can be settled.
        let tags: Vec<LeaseTag> = (0..got as u64).map(|k| LeaseTag::new(prefix.clone(), seq + k)).collect();
        {
            let mut leases = lock(&shared.leases);
            leases.reserve(got);
            for tag in &tags {
                leases.insert(tag.clone(), g);
            }
        }
        for _ in 0..got {
            shared.holder.broker().hold(&shared.groups[g].scope);
        }
        // Taken by value: each envelope's bytes move into its delivery instead of being copied.
        let mut tags = tags.into_iter();
        for (i, v, id) in taken {
            let (e, step) = lists[i];
            let entry = &shared.entries[e];
            let d = match (v, id) {
                (redis::Value::BulkString(env), _) => {
                    let Some(tag) = tags.next() else { break };
                    let decoded = envelope::decode(&env);
                    let size = env.len();
                    let settle = RedisSettle::new(shared.clone(), tag, g, e, step, epoch, env);
                    Delivery::new(decoded.message, entry.queue.clone(), decoded.redelivered, Box::new(settle))
                        .with_size(size)
                }
                (redis::Value::Int(size), id) => oversized_delivery(
                    &entry.queue,
                    size,
                    id.and_then(|id| redis::from_redis_value::<String>(id).ok()),
                    max_message_size,
                ),
                _ => continue,
            };
            if tx.send(d).await.is_err() {
                return;
            }
        }
    }
}

/// The delivery of an envelope of `queue` the script dead-lettered unread (it holds no lease nor
/// slot): `size` bytes, `id` the task id the script found in it (or "").
fn oversized_delivery(queue: &str, size: i64, id: Option<String>, limit: usize) -> Delivery {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    tracing::warn!(%queue, size, limit, "redis: oversized message dead-lettered unread");
    let too_large = ProtocolError::TooLarge { size, limit };
    let id = id.filter(|id| !id.is_empty());
    let message = Err(match lenient_task_id(&serde_json::json!({ "id": id })) {
        Some(id) => ProtocolError::InvalidHeaders { id, task: None, reply_to: None, error: Box::new(too_large) },
        None => too_large,
    });
    Delivery::new(message, queue.to_owned(), false, Box::new(Settled)).with_size(size)
}

impl RedisFetch {
    /// Sends the fetch script on the `hot` entries of group `g` for up to `n` envelopes (holding
    /// `n` slots, and `permit` when it is the last of its round) and hands it to the decoder,
    /// which waits for its reply; false when nobody receives any more.
    fn send(&mut self, g: usize, hot: Vec<usize>, n: usize, permit: Option<OwnedSemaphorePermit>) -> bool {
        let Some(decoder) = self.decoder.as_ref().filter(|d| !d.is_closed()) else { return false };
        let lists: Vec<(usize, usize)> = (0..4).flat_map(|step| hot.iter().map(move |&e| (e, step))).collect();
        // Read before the fetch runs: a lapse noticed after it means these may have been restored.
        let epoch = self.shared.holder.liveness().epoch();
        let (shared, weights, script) = (self.shared.clone(), self.weights.clone(), self.script.clone());
        if self.seq > MAX_TAG_SEQ {
            self.tag_prefix = new_tag_prefix();
            self.seq = 0;
        }
        let (mut conn, prefix, seq, max) =
            (self.conn.clone(), self.tag_prefix.clone(), self.seq, self.max_message_size);
        let script_lists = lists.clone();
        // Spawned so that it is written to the connection now, not when the decoder gets to it.
        let reply = tokio::spawn(async move {
            let group = &shared.groups[g];
            // On a cluster the holder's heartbeat must live in the group's scope first: set by
            // the script itself when the scope is not kept yet.
            let h = &shared.holder;
            let activation = h.broker().activation(h.id(), h.nonce(), h.liveness().grace(), &group.scope);
            let mut inv = script.prepare_invoke();
            inv.key(group.scope.unacked()).key(group.scope.unacked_index()).key(&group.held).key(group.scope.workers());
            for &(e, step) in &script_lists {
                inv.key(&shared.entries[e].buckets[step]);
            }
            for &(e, _) in &script_lists {
                inv.key(&shared.entries[e].dead);
            }
            inv.arg(now_secs()).arg(n).arg(&*prefix).arg(seq).arg(max);
            inv.arg(shared.holder.id());
            inv.arg(if shared.keys.is_cluster() { "0" } else { "1" }).arg(shared.keys.prefix());
            inv.arg(weights.iter().count());
            for (key, w) in weights.iter() {
                inv.arg(key).arg(w);
            }
            for &(e, _) in &script_lists {
                inv.arg(&shared.entries[e].queue);
            }
            if let Some(a) = &activation {
                a.add_to(&mut inv);
            }
            match inv.invoke_async(&mut conn).await {
                Ok(reply) => {
                    if activation.is_some() {
                        h.broker().activated(&group.scope);
                    }
                    Ok(reply)
                }
                Err(e) if e.to_string().contains("HELDELSEWHERE") => Err(BrokerError::operation(
                    "redis: another process holds this worker's heartbeat in a queue's slot; give each worker its own name (-n)",
                )),
                Err(e) => Err(broker_error("redis: fetch", e)),
            }
        });
        // Tags stay unique whatever the replies hold: each fetch has a range of its own.
        self.seq += n as u64;
        let prefix = self.tag_prefix.clone();
        decoder.send(Pending { group: g, epoch, prefix, seq, lists, hot, want: n, reply, permit }).is_ok()
    }

    /// Sends the fetch round `round` (each group with its hot entries) for `n` envelopes, split
    /// among its groups ([`shares`]), all at once; the round's `permit` goes with its last fetch
    /// (the decoder reads replies in the order sent, so it is let go once every reply of the
    /// round is in). Reported as the fetcher sees it: every slot taken (the decoder gives back
    /// the unused ones).
    fn sent(&mut self, round: Vec<(usize, Vec<usize>)>, n: usize, permit: OwnedSemaphorePermit) -> Fetched {
        self.last.clone_from(&round);
        let k = round.len();
        let mut permit = Some(permit);
        let mut used = 0;
        for (i, ((g, hot), share)) in round.into_iter().zip(shares(n, k)).enumerate() {
            let p = if i + 1 == k { permit.take() } else { None };
            let share = share.min(MAX_FETCH);
            if !self.send(g, hot, share, p) {
                return Fetched::Closed;
            }
            used += share;
        }
        Fetched::Sent { taken: used, drained: false }
    }

    /// [`Fetch::fetch`] once its place among the rounds in flight is taken: `n` slots, `permit`.
    async fn round(&mut self, n: usize, permit: OwnedSemaphorePermit) -> Fetched {
        if Instant::now() >= self.next_probe {
            self.probe().await;
            self.next_probe = Instant::now() + self.probe_every;
        }
        let shared = self.shared.clone();
        let count = shared.groups.len();
        let most = groups_per_round(n, shared.keys.is_cluster());
        let start = self.next_group % count;
        let mut round = Vec::new();
        for k in 0..count {
            if round.len() >= most {
                break;
            }
            let g = (start + k) % count;
            // Cleared before the look: a wake-up that comes after it marks them again.
            let (hot, next) = shared.wakes.take_some(&shared.groups[g].entries, self.next_entry[g], MAX_FETCH_QUEUES);
            self.next_entry[g] = next;
            if !hot.is_empty() {
                round.push((g, hot));
            }
        }
        self.next_group = round.last().map_or(start, |(g, _)| *g) + 1;
        if !round.is_empty() {
            return self.sent(round, n, permit);
        }
        let others_in_flight = self.in_flight.available_permits() + 1 < self.max_in_flight;
        if others_in_flight && self.replies.full.load(Ordering::Relaxed) && !self.last.is_empty() {
            let mut last = self.last.clone();
            last.truncate(most);
            return self.sent(last, n, permit);
        }
        Fetched::Sent { taken: 0, drained: true }
    }

    /// Marks hot the queues whose lists hold messages: on one server all of them, one `EXISTS`
    /// per [`PROBE_ENTRIES`] queues in one round trip; on a cluster [`PROBE_CLUSTER_ENTRIES`] queue
    /// shards in turn (each in a slot of its own).
    async fn probe(&mut self) {
        let shared = self.shared.clone();
        let entries = &shared.entries;
        if !shared.keys.is_cluster() {
            let mut pipe = redis::pipe();
            let chunks: Vec<std::ops::Range<usize>> =
                (0..entries.len()).step_by(PROBE_ENTRIES).map(|a| a..(a + PROBE_ENTRIES).min(entries.len())).collect();
            for r in &chunks {
                let mut cmd = redis::cmd("EXISTS");
                for e in &entries[r.clone()] {
                    // With its fair-queue ring: keyed messages wait in the keys' lines.
                    cmd.arg(&e.buckets[..]).arg(shared.keys.fair_ring(&e.queue));
                }
                pipe.add_command(cmd);
            }
            match pipe.query_async::<Vec<u64>>(&mut self.conn).await {
                Ok(counts) => {
                    for (r, _) in chunks.into_iter().zip(counts).filter(|(_, c)| *c > 0) {
                        shared.wakes.mark(r);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "redis: probing the queues failed; will retry"),
            }
            return;
        }
        let n = entries.len().min(PROBE_CLUSTER_ENTRIES);
        for k in 0..n {
            let i = (self.probe_from + k) % entries.len();
            let r: Result<u64, _> = redis::cmd("EXISTS").arg(&entries[i].buckets[..]).query_async(&mut self.conn).await;
            match r {
                Ok(0) => {}
                Ok(_) => shared.wakes.mark([i]),
                Err(e) => {
                    tracing::warn!(error = %e, "redis: probing the queues failed; will retry");
                    break;
                }
            }
        }
        self.probe_from = (self.probe_from + n) % entries.len().max(1);
    }
}

impl Fetch for RedisFetch {
    const BROKER: &'static str = "redis";
    const MAX_FETCH: usize = MAX_FETCH;

    fn slots(&self) -> &Slots {
        &self.shared.slots
    }

    /// Sends one fetch round for `n` on the hot queues of the next groups in turn that have any
    /// (from the one after the last round's last group; [`groups_per_round`] of them at most),
    /// at most [`fetches_in_flight`] rounds at once; while the replies fill their requests and
    /// none is marked, the queues of the last round sent again. Its slots are taken: the decoder
    /// gives back what the replies do not use.
    async fn fetch(&mut self, n: usize, tx: &mpsc::Sender<Delivery>) -> Fetched {
        if self.decoder.is_none() {
            let (dtx, drx) = mpsc::unbounded_channel();
            let replies = self.replies.clone();
            tokio::spawn(decode_loop(self.shared.clone(), replies, self.max_message_size, drx, tx.clone()));
            self.decoder = Some(dtx);
        }
        // Waiting here lets the oldest reply in mark its queues hot again.
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else { return Fetched::Closed };
        if let Some(error) = lock(&self.replies.failed).take() {
            return Fetched::Failed { taken: 0, error };
        }
        // On a cluster, what was freed while the last round was waiting for its place joins this
        // one: rounds of a few slots each (one per settled delivery) would each pay a round trip.
        let extra = if self.shared.keys.is_cluster() {
            self.shared.slots.try_take(CLUSTER_ROUND_MAX.saturating_sub(n))
        } else {
            0
        };
        let outcome = self.round(n + extra, permit).await;
        // The shell gives back what `n` did not use; this gives back what the extra did not.
        match outcome {
            Fetched::Sent { taken, drained } => {
                self.shared.slots.give_back((n + extra).saturating_sub(taken.max(n)));
                Fetched::Sent { taken: taken.min(n), drained }
            }
            other => {
                self.shared.slots.give_back(extra);
                other
            }
        }
    }

    /// Until a queue is marked hot, or the next probe is due.
    async fn idle(&mut self) {
        if self.shared.wakes.any() {
            return;
        }
        tokio::select! {
            _ = self.shared.wakes.notified() => {}
            _ = tokio::time::sleep_until(self.next_probe.into()) => {}
        }
    }
}

/// Renews the unsettled leases every quarter of the visibility timeout: one `ZADD XX` per group
/// and 1000 leases, [`RENEWALS_AT_ONCE`] of them on their way at once (on a cluster the leases of
/// a thousand queue shards would otherwise wait a round trip per shard, one after another).
async fn renew_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(300));
    loop {
        tokio::time::sleep(every).await;
        let now = now_secs();
        let mut renewals = Vec::new();
        for (g, tags) in shared.lease_snapshot().into_iter().enumerate() {
            for chunk in tags.chunks(1000) {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(shared.groups[g].scope.unacked_index()).arg("XX");
                for t in chunk {
                    cmd.arg(now).arg(t);
                }
                renewals.push(cmd);
            }
        }
        futures::stream::iter(renewals)
            .for_each_concurrent(RENEWALS_AT_ONCE, |cmd| {
                let mut conn = shared.conn.clone();
                async move {
                    if let Err(e) = cmd.query_async::<()>(&mut conn).await {
                        tracing::warn!(error = %e, "redis: lease renewal failed; will retry");
                    }
                }
            })
            .await;
    }
}

/// Restores the leases past the visibility timeout, in every group: on one server Kombu's way
/// ([`scripts::restore`]); on a cluster into the group's own buckets ([`scripts::restore_scope`]),
/// one group at a time in turn, at most [`RESTORE_CLUSTER_PER_SECOND`] a second ([`restore_pace`]).
async fn restore_loop(shared: Arc<Shared>, vt: Duration) {
    let every = (vt / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let script = if shared.keys.is_cluster() { scripts::restore_scope() } else { scripts::restore() };
    let mut conn = shared.conn.clone();
    let count = shared.groups.len();
    let (per_round, pause) = restore_pace(count, every, shared.keys.is_cluster());
    let mut next = 0;
    loop {
        let mut busy = false;
        let round: Vec<usize> = (0..per_round).map(|k| (next + k) % count.max(1)).collect();
        next = (next + per_round) % count.max(1);
        for group in round.into_iter().filter_map(|g| shared.groups.get(g)) {
            let cutoff = now_secs() - vt.as_secs_f64();
            match restore_group(&mut conn, &script, &shared.keys, group, cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    busy = true;
                    tracing::warn!(restored = n, "redis: restored messages whose worker stopped renewing its lease");
                    wake::publish_restored(&shared.conn, &shared.keys, &group.queues).await;
                }
                Err(e) => tracing::warn!(error = %e, "redis: restore sweep failed; will retry"),
            }
        }
        if !busy {
            tokio::time::sleep(pause).await;
        }
    }
}

/// On a cluster, visibility-timeout restores (one script per group) one second at most.
const RESTORE_CLUSTER_PER_SECOND: u32 = 2;

/// How many of `count` groups one restore round takes, and the pause after a quiet one: on one
/// server all (the one group) every `every`; on a cluster one group a round, each group every
/// `every` but at most [`RESTORE_CLUSTER_PER_SECOND`] rounds a second (a pass over 10,000 queues
/// takes about 83 minutes: the heartbeats restore a dead worker's deliveries long before).
fn restore_pace(count: usize, every: Duration, cluster: bool) -> (usize, Duration) {
    if !cluster {
        return (count, every);
    }
    let per_group = every / u32::try_from(count.max(1)).unwrap_or(u32::MAX);
    (1, per_group.max(Duration::from_secs(1) / RESTORE_CLUSTER_PER_SECOND))
}

/// One restore sweep of `group`'s leases older than `cutoff` (at most 1000 on one server, at most
/// [`RESTORE_ROUNDS`] rounds of 1000 on a cluster, past leases of queues other consumers serve).
async fn restore_group(
    conn: &mut RedisConn,
    script: &Script,
    keys: &Keys,
    group: &Group,
    cutoff: f64,
) -> Result<u64, redis::RedisError> {
    if !keys.is_cluster() {
        let mut inv = script.prepare_invoke();
        inv.key(group.scope.unacked()).key(group.scope.unacked_index()).arg(cutoff).arg(1000).arg(keys.prefix());
        return inv.invoke_async(conn).await;
    }
    let (mut restored, mut offset) = (0, 0u64);
    for _ in 0..RESTORE_ROUNDS {
        let mut inv = script.prepare_invoke();
        inv.key(group.scope.unacked()).key(group.scope.unacked_index()).arg(cutoff).arg(1000).arg(offset);
        for (q, shard) in &group.queues {
            for b in keys.buckets(q, *shard) {
                inv.key(b);
            }
            inv.arg(q);
        }
        let (n, skipped, examined): (u64, u64, u64) = inv.invoke_async(conn).await?;
        restored += n;
        offset += skipped;
        if examined < 1000 {
            break;
        }
    }
    Ok(restored)
}

/// Moves due ETA messages of the queues (and shards) consumed to their buckets: reads the
/// next-due index ([`scripts::due`]), moves the due queues that are ours, and sleeps until the
/// next due time (at most [`PROMOTE_CAP`]); every [`SWEEP_EVERY`] sweeps the delayed sets for what
/// the index misses ([`sweep_delayed`]).
async fn promote_loop(shared: Arc<Shared>) {
    let keys = &shared.keys;
    let mine: HashMap<String, usize> =
        shared.entries.iter().enumerate().map(|(i, e)| (Keys::due_member(&e.queue, e.shard), i)).collect();
    let scan = scripts::due();
    let script = if keys.is_cluster() { scripts::promote_into() } else { scripts::promote() };
    let mut conn = shared.conn.clone();
    let mut next_sweep = Instant::now();
    let mut sweep_from = 0;
    loop {
        if Instant::now() >= next_sweep {
            sweep_from = sweep_delayed(&shared, &mut conn, sweep_from).await;
            next_sweep = Instant::now() + SWEEP_EVERY;
        }
        let r: Result<(Vec<String>, i64), _> = scan.key(keys.due()).arg(DUE_LIMIT).invoke_async(&mut conn).await;
        let wait = match r {
            Ok((due, next)) => {
                let mut moved = 0;
                for i in due.iter().filter_map(|m| mine.get(m)) {
                    moved += promote(&shared, &mut conn, &script, *i).await;
                }
                match u64::try_from(next) {
                    // More may be due at once (a promotion moves at most 1000 per queue).
                    _ if moved > 0 => Duration::ZERO,
                    Ok(ms) => PROMOTE_CAP.min(Duration::from_millis(ms)),
                    Err(_) => PROMOTE_CAP,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "redis: reading the next-due index failed; will retry");
                PROMOTE_CAP
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Moves the due messages of entry `i` and keeps its member of the next-due index true: removed
/// first, put back with the earliest due time left (`ZADD LT`, so a defer racing with this keeps
/// the earlier of both). Wakes the queue's consumers when it moved any. Returns how many it moved.
async fn promote(shared: &Shared, conn: &mut RedisConn, script: &Script, i: usize) -> u64 {
    let keys = &shared.keys;
    let e = &shared.entries[i];
    let member = Keys::due_member(&e.queue, e.shard);
    let r = async {
        redis::cmd("ZREM").arg(keys.due()).arg(&member).query_async::<i64>(conn).await?;
        let mut inv = script.prepare_invoke();
        inv.key(keys.delayed(&e.queue, e.shard)).arg(1000);
        if keys.is_cluster() {
            for b in &e.buckets {
                inv.key(b);
            }
        } else {
            inv.arg(keys.prefix()).arg(&e.queue);
        }
        let (moved, next): (u64, i64) = match inv.invoke_async(conn).await {
            Ok(r) => r,
            Err(err) => {
                // Back into the index, due now: the next read retries it.
                let _ = redis::cmd("ZADD").arg(keys.due()).arg("LT").arg(0).arg(&member).query_async::<i64>(conn).await;
                return Err(err);
            }
        };
        if next >= 0 {
            redis::cmd("ZADD").arg(keys.due()).arg("LT").arg(next).arg(&member).query_async::<i64>(conn).await?;
        }
        if moved > 0 {
            tracing::debug!(queue = %e.queue, moved, "redis: delayed messages are due");
            shared.wakes.mark([i]);
            let channel = keys.wake(&e.queue, e.shard);
            let cmd = redis::cmd("PUBLISH").arg(&channel).arg("").to_owned();
            if let Err(err) = conn.command_via(&channel, cmd).await {
                tracing::debug!(error = %err, "redis: cannot publish a wake-up; consumers find the messages by their probe");
            }
        }
        Ok::<_, redis::RedisError>(moved)
    };
    match r.await {
        Ok(moved) => moved,
        Err(err) => {
            tracing::warn!(error = %err, queue = %e.queue, "redis: promoting delayed messages failed; will retry");
            0
        }
    }
}

/// Puts the delayed sets of the entries consumed that hold messages into the next-due index (what
/// a crash between a defer and its index write, or an older version, left out): on one server all
/// of them ([`SWEEP_BATCH`] at a time); on a cluster [`PROBE_CLUSTER_ENTRIES`] from `from` on.
/// Returns where the next cluster sweep starts.
async fn sweep_delayed(shared: &Shared, conn: &mut RedisConn, from: usize) -> usize {
    let keys = &shared.keys;
    let entries = &shared.entries;
    if !keys.is_cluster() {
        // Empty sets do not exist: one `EXISTS` per batch finds the batches worth a script.
        let mut pipe = redis::pipe();
        for batch in entries.chunks(SWEEP_BATCH) {
            let mut cmd = redis::cmd("EXISTS");
            for e in batch {
                cmd.arg(keys.delayed(&e.queue, e.shard));
            }
            pipe.add_command(cmd);
        }
        let counts: Vec<u64> = match pipe.query_async(conn).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "redis: sweeping the delayed sets failed; will retry");
                return 0;
            }
        };
        let script = scripts::due_sweep();
        for (batch, _) in entries.chunks(SWEEP_BATCH).zip(counts).filter(|(_, c)| *c > 0) {
            let mut inv = script.prepare_invoke();
            inv.key(keys.due());
            for e in batch {
                inv.key(keys.delayed(&e.queue, e.shard)).arg(Keys::due_member(&e.queue, e.shard));
            }
            if let Err(e) = inv.invoke_async::<u64>(conn).await {
                tracing::warn!(error = %e, "redis: sweeping the delayed sets failed; will retry");
                break;
            }
        }
        return 0;
    }
    let n = entries.len().min(PROBE_CLUSTER_ENTRIES);
    for k in 0..n {
        let e = &entries[(from + k) % entries.len()];
        let first: Result<Vec<(String, f64)>, _> = redis::cmd("ZRANGE")
            .arg(keys.delayed(&e.queue, e.shard))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(conn)
            .await;
        let r = match first {
            Ok(first) => match first.first() {
                Some((_, score)) => redis::cmd("ZADD")
                    .arg(keys.due())
                    .arg("LT")
                    .arg(*score as i64)
                    .arg(Keys::due_member(&e.queue, e.shard))
                    .query_async::<i64>(conn)
                    .await
                    .map(drop),
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "redis: sweeping the delayed sets failed; will retry");
            break;
        }
    }
    (from + n) % entries.len().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_tags_are_written_as_the_fetch_script_writes_them() {
        use redis::ToRedisArgs;
        let tag = |seq| LeaseTag::new("ab.".into(), seq);
        // Lua's `prefix .. seq` writes an integral number below 10^14 with all its digits.
        assert_eq!(tag(0).to_string(), "ab.0");
        assert_eq!(tag(0).to_redis_args(), vec![b"ab.0".to_vec()]);
        assert_eq!(tag(u64::MAX).to_redis_args(), vec![format!("ab.{}", u64::MAX).into_bytes()], "20 digits");
        assert_eq!(tag(127).to_redis_args(), vec![b"ab.127".to_vec()]);
        // The last tag of a fetch sent just below the cap, still below 10^14.
        let last = tag(MAX_TAG_SEQ + MAX_FETCH as u64);
        assert_eq!(last.to_redis_args(), vec![b"ab.10000000000128".to_vec()]);
        assert_eq!(last.to_string(), "ab.10000000000128");
        // In a command, each tag is one argument of its own.
        let args = redis::cmd("HDEL").arg("unacked").arg(&[tag(1), tag(22)][..]).get_packed_command();
        assert!(String::from_utf8_lossy(&args).ends_with("$4\r\nab.1\r\n$5\r\nab.22\r\n"), "{args:?}");
    }

    #[test]
    fn lease_tags_of_two_prefixes_are_told_apart() {
        let (a, b): (Arc<str>, Arc<str>) = ("a.".into(), "b.".into());
        let mut leases = HashMap::new();
        leases.insert(LeaseTag::new(a.clone(), 7), 0);
        leases.insert(LeaseTag::new(b.clone(), 7), 1);
        assert_eq!(leases.len(), 2);
        assert_eq!(leases.remove(&LeaseTag::new("a.".into(), 7)), Some(0), "equal by value, not by pointer");
        assert_eq!(leases.remove(&LeaseTag::new(b, 7)), Some(1));
        assert!(leases.remove(&LeaseTag::new(a, 8)).is_none());
    }

    #[test]
    fn a_cluster_round_splits_its_slots_over_up_to_sixteen_shards() {
        assert_eq!(groups_per_round(MAX_FETCH, false), 1, "one server: its one group");
        assert_eq!(groups_per_round(1, true), 1);
        assert_eq!(groups_per_round(2 * MIN_GROUP_SHARE - 1, true), 1);
        assert_eq!(groups_per_round(4 * MIN_GROUP_SHARE, true), 4);
        assert_eq!(groups_per_round(CLUSTER_ROUND_MAX, true), CLUSTER_GROUPS_PER_ROUND);
        for (n, k) in [(128, 8), (7, 3), (5, 5), (3, 1), (0, 1), (2048, 16)] {
            let s: Vec<usize> = shares(n, k).collect();
            assert_eq!(s.len(), k, "{n} over {k}");
            assert_eq!(s.iter().sum::<usize>(), n, "{n} over {k}: every slot given out once");
            assert!(s.iter().max().unwrap() - s.iter().min().unwrap() <= 1, "{n} over {k}: even");
        }
        assert_eq!(shares(7, 3).collect::<Vec<_>>(), vec![3, 2, 2]);
    }

    /// No share of a full round is above what one fetch script takes.
    const _: () = assert!(CLUSTER_ROUND_MAX / CLUSTER_GROUPS_PER_ROUND <= MAX_FETCH);

    #[test]
    fn cluster_restores_go_one_group_at_a_time_at_most_twice_a_second() {
        let every = Duration::from_secs(60);
        assert_eq!(restore_pace(1, every, false), (1, every), "one server: the one group every `every`");
        assert_eq!(restore_pace(1, every, true), (1, every), "one queue: as often as on one server");
        assert_eq!(restore_pace(60, every, true), (1, Duration::from_secs(1)));
        assert_eq!(restore_pace(10_000, every, true), (1, Duration::from_millis(500)));
        assert_eq!(restore_pace(0, every, true), (1, every));
    }

    #[test]
    fn the_probe_costs_about_ten_commands_a_second_whatever_the_queue_count() {
        assert_eq!(probe_every(1, false), Duration::from_millis(100));
        assert_eq!(probe_every(PROBE_ENTRIES, false), Duration::from_millis(100));
        assert_eq!(probe_every(PROBE_ENTRIES + 1, false), Duration::from_millis(200));
        assert_eq!(probe_every(10 * PROBE_ENTRIES, false), Duration::from_secs(1));
        assert_eq!(probe_every(3, true), PROBE_EVERY);
        for n in [1usize, 1_000, 5_000, 10_000, 100_000] {
            let per_second = n.div_ceil(PROBE_ENTRIES) as f64 / probe_every(n, false).as_secs_f64();
            assert!(per_second <= 10.0 + f64::EPSILON * 10.0, "{n} queues: {per_second} EXISTS/s");
        }
    }
}

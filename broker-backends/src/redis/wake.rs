//! Wake-ups: how an idle consumer learns that one of its queues has messages, at a cost that does
//! not grow with the number of queues it consumes.
//!
//! - Our producers `PUBLISH` to the queue's wake-up channel ([`super::keys::Keys::wake`]) in the
//!   same pipeline as the `LPUSH` (so after it); requeues and dead letters do it in their settle
//!   script, the delayed mover after it moved messages, a restore of leases on the channel of every
//!   queue it may have refilled ([`publish_restored`]).
//! - Each consumer holds one subscriber connection ([`listen`]) to the channels of all its queues
//!   (it sends no command while idle) and marks the queue [`Wakes`] names hot; the fetch then
//!   runs only on hot queues, and an idle consumer waits for one to become hot.
//! - No wake-up is lost while subscribed: a fetch clears a queue's mark *before* it looks, and a
//!   wake-up comes after its message is in the list. When the subscription is (re)made every
//!   queue is marked hot, so what arrived while it was down is fetched.
//! - Python Celery producers do not publish wake-ups: the consumer probes its queues' lists with
//!   `EXISTS` once a second ([`super::consumer`]), in batches of many keys per command.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use celery_core::sync::lock;
use tokio::sync::Notify;

use super::connection::RedisConn;
use super::keys::Keys;
use super::pubsub::{self, Channels};

/// Which consumed (queue, shard) entries may hold messages, and the signal that one became so.
#[derive(Debug)]
pub(super) struct Wakes {
    hot: Mutex<Hot>,
    notify: Notify,
}

#[derive(Debug)]
struct Hot {
    flags: Vec<bool>,
    count: usize,
}

impl Wakes {
    /// `n` entries, all hot (a consumer's first fetch looks at every queue).
    pub(super) fn new(n: usize) -> Wakes {
        Wakes { hot: Mutex::new(Hot { flags: vec![true; n], count: n }), notify: Notify::new() }
    }

    /// Marks `entries` hot and wakes the waiting fetcher.
    pub(super) fn mark(&self, entries: impl IntoIterator<Item = usize>) {
        let mut any = false;
        {
            let mut hot = lock(&self.hot);
            for e in entries {
                if let Some(f) = hot.flags.get_mut(e) {
                    if !*f {
                        *f = true;
                        hot.count += 1;
                    }
                    any = true;
                }
            }
        }
        if any {
            self.notify.notify_one();
        }
    }

    /// Marks every entry hot.
    pub(super) fn mark_all(&self) {
        let n = lock(&self.hot).flags.len();
        self.mark(0..n);
    }

    /// Clears the marks of `entries` and returns those that were hot, in the order given.
    #[cfg(test)]
    pub(super) fn take(&self, entries: &[usize]) -> Vec<usize> {
        self.take_some(entries, 0, usize::MAX).0
    }

    /// Clears the marks of up to `max` hot entries of `entries`, looking from position `from` on
    /// (round the end to the start), and returns them in the order of `entries` with the position
    /// after the last one taken (where the next look starts, so every hot entry has its turn).
    pub(super) fn take_some(&self, entries: &[usize], from: usize, max: usize) -> (Vec<usize>, usize) {
        let mut hot = lock(&self.hot);
        let n = entries.len();
        if hot.count == 0 || n == 0 {
            return (Vec::new(), from);
        }
        let mut out = Vec::new();
        let mut next = from % n;
        for k in 0..n {
            if out.len() >= max {
                break;
            }
            let pos = (from + k) % n;
            if let Some(f) = hot.flags.get_mut(entries[pos]) {
                if *f {
                    *f = false;
                    out.push((pos, entries[pos]));
                    next = (pos + 1) % n;
                }
            }
        }
        hot.count -= out.len();
        out.sort_unstable();
        (out.into_iter().map(|(_, e)| e).collect(), next)
    }

    /// True when some entry is hot.
    pub(super) fn any(&self) -> bool {
        lock(&self.hot).count > 0
    }

    /// Waits for a [`Wakes::mark`] (one made since the last wait returns at once).
    pub(super) async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Subscribes to `channels` (each names the entries it wakes) and `all` (wakes every entry) on a
/// connection of its own, and marks [`Wakes`] for every message. Every entry is marked hot each
/// time the subscription is made (again), so what was published meanwhile is fetched. Runs until
/// aborted (with its consumer).
pub(super) async fn listen(
    conn: RedisConn,
    channels: HashMap<String, Vec<usize>>,
    all: Option<String>,
    wakes: Arc<Wakes>,
) {
    let names = Channels { names: channels.keys().cloned().chain(all.clone()).collect(), patterns: Vec::new() };
    pubsub::follow(conn, names, None, "wake-up", |m| {
        match m {
            None => wakes.mark_all(),
            Some(m) => {
                let name = m.get_channel_name();
                if all.as_deref() == Some(name) {
                    wakes.mark_all();
                } else if let Some(entries) = channels.get(name) {
                    wakes.mark(entries.iter().copied());
                }
            }
        }
        std::future::ready(ControlFlow::Continue(()))
    })
    .await
}

/// After a restore put leases back into their lists: on one server wakes every consumer of the
/// database ([`Keys::wake_all`]: the restored ones may be of any queue); on a cluster the
/// consumers of `queues` (the scope's, the only ones a restore there refills).
pub(super) async fn publish_restored(conn: &RedisConn, keys: &Keys, queues: &[(String, u16)]) {
    if keys.is_cluster() {
        for (q, shard) in queues {
            let channel = keys.wake(q, *shard);
            let cmd = redis::cmd("PUBLISH").arg(&channel).arg("").to_owned();
            if let Err(e) = conn.command_via(&channel, cmd).await {
                tracing::debug!(error = %e, "redis: cannot publish a wake-up; consumers find the messages by their probe");
            }
        }
        return;
    }
    let mut c = conn.clone();
    if let Err(e) = redis::cmd("PUBLISH").arg(keys.wake_all()).arg("").query_async::<i64>(&mut c).await {
        tracing::debug!(error = %e, "redis: cannot publish a wake-up; consumers find the messages by their probe");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_taken_once_and_wakes_the_waiter() {
        let w = Wakes::new(4);
        assert!(w.any());
        assert_eq!(w.take(&[0, 2]), [0, 2]);
        assert_eq!(w.take(&[0, 1, 2, 3]), [1, 3]);
        assert!(!w.any() && w.take(&[0, 1, 2, 3]).is_empty());
        w.mark([2, 9]);
        assert!(w.any());
        assert_eq!(w.take(&[3, 2]), [2]);
        w.mark_all();
        assert_eq!(w.take(&[0, 1, 2, 3]), [0, 1, 2, 3]);
    }

    #[test]
    fn hot_entries_are_taken_a_few_at_a_time_in_turn() {
        let w = Wakes::new(5);
        let all = [0, 1, 2, 3, 4];
        assert_eq!(w.take_some(&all, 3, 3), (vec![0, 3, 4], 1));
        assert_eq!(w.take_some(&all, 1, 3), (vec![1, 2], 3));
        assert_eq!(w.take_some(&all, 3, 3), (vec![], 3));
        w.mark([2]);
        assert_eq!(w.take_some(&all, 3, 1), (vec![2], 3));
    }

    #[tokio::test]
    async fn a_mark_made_before_the_wait_is_not_lost() {
        let w = Wakes::new(1);
        w.take(&[0]);
        w.mark([0]);
        tokio::time::timeout(std::time::Duration::from_secs(5), w.notified()).await.expect("woken");
    }
}

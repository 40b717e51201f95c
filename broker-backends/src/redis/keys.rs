//! Kombu's key layout on Redis, behind the optional `global_keyprefix` (see [`super::scripts`] for
//! what each key holds): the priority buckets of a queue, the `unacked` lease hash and its index,
//! the binding sets of exchanges, the fanout channels, and ours (`_celery_rs.*`): delayed messages,
//! leases, documents, and our consumers' heartbeats with what each holds.

/// Kombu's separator between a queue name and its priority bucket.
pub(crate) const SEP: &str = "\x06\x16";
/// Kombu's priority steps, consumed in this order.
pub(crate) const STEPS: [u8; 4] = [0, 3, 6, 9];

/// Key names, with the prefix applied.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys behind `prefix` (Kombu's `global_keyprefix`; empty for none).
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_owned() }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }
    pub(crate) fn bucket(&self, queue: &str, step: u8) -> String {
        if step == 0 {
            format!("{}{queue}", self.prefix)
        } else {
            format!("{}{queue}{SEP}{step}", self.prefix)
        }
    }
    pub(crate) fn buckets(&self, queue: &str) -> impl Iterator<Item = String> + '_ {
        let q = queue.to_owned();
        STEPS.iter().map(move |s| self.bucket(&q, *s))
    }
    pub(crate) fn unacked(&self) -> String {
        format!("{}unacked", self.prefix)
    }
    pub(crate) fn unacked_index(&self) -> String {
        format!("{}unacked_index", self.prefix)
    }
    pub(crate) fn delayed(&self, queue: &str) -> String {
        format!("{}_celery_rs.delayed.{queue}", self.prefix)
    }

    /// Kombu's fanout channel of `exchange` for `routing_key`: `/<db>.<exchange>/<routing key>`,
    /// or `/<db>.<exchange>` without a routing key.
    pub(crate) fn fanout(&self, db: u32, exchange: &str, routing_key: &str) -> String {
        if routing_key.is_empty() {
            format!("{}/{db}.{exchange}", self.prefix)
        } else {
            format!("{}/{db}.{exchange}/{routing_key}", self.prefix)
        }
    }

    /// A lease (`SET NX PX` with renewal by its holder).
    pub(crate) fn lease(&self, name: &str) -> String {
        format!("{}_celery_rs.lease.{name}", self.prefix)
    }

    /// A holder's heartbeat (`SET PX grace`, renewed by the holder): `<prefix>_celery_rs.worker.<holder>`.
    pub(crate) fn heartbeat(&self, holder: &str) -> String {
        format!("{}_celery_rs.worker.{holder}", self.prefix)
    }

    /// The tags a holder has in `unacked`: `<prefix>_celery_rs.held.<holder>`.
    pub(crate) fn held(&self, holder: &str) -> String {
        format!("{}_celery_rs.held.{holder}", self.prefix)
    }

    /// The holders that may hold deliveries (whose heartbeats the sweep checks).
    pub(crate) fn workers(&self) -> String {
        format!("{}_celery_rs.workers", self.prefix)
    }

    /// A stored document.
    pub(crate) fn doc(&self, key: &str) -> String {
        format!("{}_celery_rs.doc.{key}", self.prefix)
    }
    pub(crate) fn binding(&self, exchange: &str) -> String {
        format!("{}_kombu.binding.{exchange}", self.prefix)
    }
}

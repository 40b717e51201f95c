//! What a broker or result backend can do beyond the minimum, as traits of their own (apalis-style).
//!
//! Every broker publishes, consumes, purges, counts and peeks ([`Broker`]); every result backend
//! stores, reads, waits and forgets ([`ResultBackend`]). The rest is optional, and a backend either
//! implements a capability's trait or does not:
//!
//! | capability | trait | used by |
//! | --- | --- | --- |
//! | exchanges and bindings | [`Routing`] | `declare`/`bind`, topic and fanout routes |
//! | broadcasts | [`Broadcasts`] | events, remote control (`inspect`, `control`), the monitor |
//! | leases | [`Leases`] | beat's leader election |
//! | documents | [`Documents`] | beat's schedule state |
//! | chords | [`Chords`] | chord counting |
//! | idempotency claims | [`Claims`] | `Signature::idempotency_key` |
//! | task history | [`History`](crate::history::History) | the monitor's history (brokers and result backends) |
//! | per-key concurrency slots | [`KeySlots`](crate::flow::KeySlots) | `#[task(key_concurrency = N)]` |
//! | cluster-wide rate limits | [`RateBuckets`](crate::flow::RateBuckets) | `#[task(rate_scope = "cluster")]` |
//! | fair queues | [`FairQueues`](crate::flow::FairQueues) | `Signature::fairness_key` |
//!
//! Code that holds a concrete backend calls the trait's methods directly, so a missing capability is
//! a compile error there. Code that holds `dyn Broker` asks with [`Broker::routing`] (and the like),
//! which return `None` when the broker lacks it, or with `require_*`, which turn that `None` into a
//! clear [`BrokerError::Unsupported`]. [`Capabilities`] lists what a broker or backend offers, for
//! the monitor and the CLI.
//!
//! ```no_run
//! # async fn demo(broker: std::sync::Arc<dyn celery_core::Broker>) -> Result<(), celery_core::BrokerError> {
//! use celery_core::capability::Capabilities;
//! let caps = Capabilities::of_broker(broker.as_ref());
//! println!("{} offers: {caps}", broker.kind());
//! if let Some(leases) = broker.leases() {
//!     let leader = leases.lease("beat", "host-1", std::time::Duration::from_secs(10)).await?;
//!     println!("leader: {leader}");
//! }
//! # Ok(()) }
//! ```
//!
//! [`Broker`]: crate::Broker
//! [`Broker::routing`]: crate::Broker::routing
//! [`ResultBackend`]: crate::ResultBackend

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{ChordMember, ResultBackend};
use crate::broker::{Broker, Subscription};
use crate::error::{BackendError, BrokerError};
use crate::protocol::Message;
use crate::routing::{Binding, Exchange, ExchangeKind};

/// Exchanges and bindings, RabbitMQ-style (emulated by brokers that have none).
#[async_trait]
pub trait Routing: Send + Sync {
    /// Declares an exchange (durably, where the broker keeps declarations). A broker without this
    /// kind of exchange fails with [`BrokerError::Unsupported`], never silently.
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), BrokerError>;

    /// Binds a queue to an exchange.
    async fn bind(&self, binding: &Binding) -> Result<(), BrokerError>;
}

/// Broadcasts to whoever listens at the moment: Celery's events, control requests and replies.
#[async_trait]
pub trait Broadcasts: Send + Sync {
    /// Publishes `msg` to whoever subscribes to `exchange` at this moment, at most once; nothing is
    /// stored for absent subscribers. The exchange is declared as given on brokers that declare
    /// exchanges (RabbitMQ). On Redis, fanout and topic broadcasts are Kombu's PUB/SUB fanout and
    /// direct ones go to the bound lists, as Celery's events and control replies do.
    async fn broadcast(&self, exchange: &Exchange, routing_key: &str, msg: &Message) -> Result<(), BrokerError>;

    /// Receives the broadcasts to `exchange` whose routing key matches `pattern` (the binding key:
    /// topic syntax, `*` one word and `#` any, for topic exchanges; the routing key itself for
    /// direct ones), from now until the subscription is dropped.
    async fn subscribe(&self, exchange: &Exchange, pattern: &str) -> Result<Box<dyn Subscription>, BrokerError>;
}

/// Named leases with a time to live: beat's leader election rests on them.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Takes or renews the lease `name` for `holder`: `Ok(true)` while `holder` holds it. A lease
    /// not renewed within `ttl` (or whose holder's connection died, where the broker can tell) goes
    /// to the next caller.
    async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, BrokerError>;

    /// Gives up the lease `name` if `holder` holds it, so the next caller takes it at once.
    async fn release(&self, name: &str, holder: &str) -> Result<(), BrokerError>;
}

/// Small documents stored durably under a key: beat's schedule state.
#[async_trait]
pub trait Documents: Send + Sync {
    /// The document stored under `key`, if any.
    async fn load_doc(&self, key: &str) -> Result<Option<Vec<u8>>, BrokerError>;

    /// Stores `doc` durably under `key`, replacing what was there.
    async fn store_doc(&self, key: &str, doc: &[u8]) -> Result<(), BrokerError>;
}

/// Chord counting in the result backend, atomically across workers (Celery's `set_chord_size` and
/// `on_chord_part_return`).
#[async_trait]
pub trait Chords: Send + Sync {
    /// Records that the chord of group `group_id` has `size` members. Called before any member is
    /// sent.
    async fn chord_size(&self, group_id: &str, size: usize) -> Result<(), BackendError>;

    /// Counts a member's final state into its chord, atomically. Returns every member, in group
    /// order, to exactly one caller: the one whose report completed the chord. A member reported
    /// twice (a retry or a redelivery) counts once; the completing member reporting again (its
    /// worker died before acking) gets the members again, so the body is sent at least once.
    async fn chord_part(&self, group_id: &str, member: &ChordMember) -> Result<Option<Vec<ChordMember>>, BackendError>;

    /// Forgets a chord's tally once its body was sent.
    async fn chord_done(&self, group_id: &str) -> Result<(), BackendError>;
}

/// Several task states stored in one call (one script, one statement): a worker whose tasks end
/// together gathers the states they store while its last call is on its way, and sends them with
/// this instead of one [`ResultBackend::store`] each. It changes the cost, not what is stored, so
/// [`Capabilities`] does not list it.
///
/// ```no_run
/// # async fn demo(backend: std::sync::Arc<dyn celery_core::ResultBackend>) -> Result<(), celery_core::BackendError> {
/// use celery_core::TaskMeta;
/// let metas = [TaskMeta::success("id-1", 1.into()), TaskMeta::success("id-2", 2.into())];
/// match backend.store_batches() {
///     Some(batches) => batches.store_many(&metas).await?,
///     None => {
///         for m in &metas {
///             backend.store(m).await?;
///         }
///     }
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait StoreBatches: Send + Sync {
    /// Stores `metas` in order, each as [`ResultBackend::store`] would (waking its waiters, never
    /// over a stored SUCCESS). After an error some of them may be stored: storing those again is
    /// harmless.
    async fn store_many(&self, metas: &[crate::backend::TaskMeta]) -> Result<(), BackendError>;
}

/// Idempotency claims in the result backend: one task per key within a window.
#[async_trait]
pub trait Claims: Send + Sync {
    /// Claims the idempotency `key` for `task_id` for `ttl`: `None` when this call claimed it,
    /// else the task id that holds it. Atomic across processes.
    async fn claim(&self, key: &str, task_id: &str, ttl: Duration) -> Result<Option<String>, BackendError>;

    /// Frees `key` if `task_id` holds it (its send failed).
    async fn unclaim(&self, key: &str, task_id: &str) -> Result<(), BackendError>;
}

/// The optional capabilities a broker or result backend offers, for messages and listings.
///
/// ```
/// use celery_core::capability::Capabilities;
/// let mut caps = Capabilities::default();
/// caps.leases = true;
/// caps.documents = true;
/// assert_eq!(caps.to_string(), "leases, documents");
/// assert_eq!(caps.lacking(Capabilities::BROKER).to_string(), "routing, broadcasts, history");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Exchanges and bindings ([`Routing`]).
    pub routing: bool,
    /// Broadcasts ([`Broadcasts`]).
    pub broadcasts: bool,
    /// Leases ([`Leases`]).
    pub leases: bool,
    /// Stored documents ([`Documents`]).
    pub documents: bool,
    /// Chord counting ([`Chords`]).
    pub chords: bool,
    /// Idempotency claims ([`Claims`]).
    pub claims: bool,
    /// Task history ([`History`](crate::history::History)).
    pub history: bool,
}

impl Capabilities {
    /// What `broker` offers.
    pub fn of_broker(broker: &dyn Broker) -> Capabilities {
        Capabilities {
            routing: broker.routing().is_some(),
            broadcasts: broker.broadcasts().is_some(),
            leases: broker.leases().is_some(),
            documents: broker.documents().is_some(),
            history: broker.history().is_some(),
            ..Capabilities::default()
        }
    }

    /// What `backend` offers.
    pub fn of_backend(backend: &dyn ResultBackend) -> Capabilities {
        Capabilities {
            chords: backend.chords().is_some(),
            claims: backend.claims().is_some(),
            history: backend.history().is_some(),
            ..Capabilities::default()
        }
    }

    /// Every capability a broker can have: [`Routing`], [`Broadcasts`], [`Leases`], [`Documents`],
    /// history.
    pub const BROKER: Capabilities = Capabilities {
        routing: true,
        broadcasts: true,
        leases: true,
        documents: true,
        chords: false,
        claims: false,
        history: true,
    };

    /// Every capability a result backend can have: [`Chords`], [`Claims`], history.
    pub const BACKEND: Capabilities = Capabilities {
        routing: false,
        broadcasts: false,
        leases: false,
        documents: false,
        chords: true,
        claims: true,
        history: true,
    };

    /// Those of `all` that this one lacks: `Capabilities::of_broker(b).lacking(Capabilities::BROKER)`.
    pub fn lacking(&self, all: Capabilities) -> Capabilities {
        Capabilities {
            routing: all.routing && !self.routing,
            broadcasts: all.broadcasts && !self.broadcasts,
            leases: all.leases && !self.leases,
            documents: all.documents && !self.documents,
            chords: all.chords && !self.chords,
            claims: all.claims && !self.claims,
            history: all.history && !self.history,
        }
    }

    fn names(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.routing, "routing"),
            (self.broadcasts, "broadcasts"),
            (self.leases, "leases"),
            (self.documents, "documents"),
            (self.chords, "chords"),
            (self.claims, "claims"),
            (self.history, "history"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.names().collect();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// Writes the accessors of the capabilities a backend implements, inside its `impl Broker` or
/// `impl ResultBackend` block: `offers!(routing, leases)` stands for `fn routing(&self) ->
/// Option<&dyn Routing> { Some(self) }` and the same for `leases`. The type must implement each
/// capability's trait.
///
/// ```
/// use async_trait::async_trait;
/// use celery_core::capability::{Capabilities, Claims};
/// use celery_core::{BackendError, ResultBackend, TaskMeta};
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// struct Claimer;
///
/// #[async_trait]
/// impl Claims for Claimer {
///     async fn claim(&self, _key: &str, _id: &str, _ttl: Duration) -> Result<Option<String>, BackendError> {
///         Ok(None)
///     }
///     async fn unclaim(&self, _key: &str, _id: &str) -> Result<(), BackendError> {
///         Ok(())
///     }
/// }
///
/// #[async_trait]
/// impl ResultBackend for Claimer {
///     async fn store(&self, _meta: &TaskMeta) -> Result<(), BackendError> {
///         Ok(())
///     }
///     async fn get(&self, _id: &str) -> Result<Option<TaskMeta>, BackendError> {
///         Ok(None)
///     }
///     async fn wait(&self, _id: &str, _timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
///         Ok(None)
///     }
///     async fn forget(&self, _id: &str) -> Result<(), BackendError> {
///         Ok(())
///     }
///     celery_core::offers!(claims);
/// }
///
/// assert_eq!(Capabilities::of_backend(&Claimer).to_string(), "claims");
/// ```
#[macro_export]
macro_rules! offers {
    ($($capability:ident),+ $(,)?) => {
        $( $crate::offers!(@one $capability); )+
    };
    (@one routing) => {
        fn routing(&self) -> ::std::option::Option<&dyn $crate::capability::Routing> {
            ::std::option::Option::Some(self)
        }
    };
    (@one broadcasts) => {
        fn broadcasts(&self) -> ::std::option::Option<&dyn $crate::capability::Broadcasts> {
            ::std::option::Option::Some(self)
        }
    };
    (@one leases) => {
        fn leases(&self) -> ::std::option::Option<&dyn $crate::capability::Leases> {
            ::std::option::Option::Some(self)
        }
    };
    (@one documents) => {
        fn documents(&self) -> ::std::option::Option<&dyn $crate::capability::Documents> {
            ::std::option::Option::Some(self)
        }
    };
    (@one key_slots) => {
        fn key_slots(&self) -> ::std::option::Option<&dyn $crate::flow::KeySlots> {
            ::std::option::Option::Some(self)
        }
    };
    (@one rate_buckets) => {
        fn rate_buckets(&self) -> ::std::option::Option<&dyn $crate::flow::RateBuckets> {
            ::std::option::Option::Some(self)
        }
    };
    (@one fair_queues) => {
        fn fair_queues(&self) -> ::std::option::Option<&dyn $crate::flow::FairQueues> {
            ::std::option::Option::Some(self)
        }
    };
    (@one chords) => {
        fn chords(&self) -> ::std::option::Option<&dyn $crate::capability::Chords> {
            ::std::option::Option::Some(self)
        }
    };
    (@one history) => {
        fn history(&self) -> ::std::option::Option<&dyn $crate::history::History> {
            ::std::option::Option::Some(self)
        }
    };
    (@one store_batches) => {
        fn store_batches(&self) -> ::std::option::Option<&dyn $crate::capability::StoreBatches> {
            ::std::option::Option::Some(self)
        }
    };
    (@one claims) => {
        fn claims(&self) -> ::std::option::Option<&dyn $crate::capability::Claims> {
            ::std::option::Option::Some(self)
        }
    };
}

impl dyn Broker {
    /// The broker's [`Routing`], or an error saying it has none (naming `what` was wanted).
    pub fn require_routing(&self, what: &str) -> Result<&dyn Routing, BrokerError> {
        self.routing().ok_or_else(|| self.lacks("exchanges and bindings", what))
    }

    /// The broker's [`Broadcasts`], or an error saying it has none.
    pub fn require_broadcasts(&self, what: &str) -> Result<&dyn Broadcasts, BrokerError> {
        self.broadcasts().ok_or_else(|| self.lacks("broadcasts", what))
    }

    /// The broker's [`Leases`], or an error saying it has none.
    pub fn require_leases(&self, what: &str) -> Result<&dyn Leases, BrokerError> {
        self.leases().ok_or_else(|| self.lacks("leases", what))
    }

    /// The broker's [`Documents`], or an error saying it has none.
    pub fn require_documents(&self, what: &str) -> Result<&dyn Documents, BrokerError> {
        self.documents().ok_or_else(|| self.lacks("stored documents", what))
    }

    /// The broker's [`KeySlots`](crate::flow::KeySlots), or an error saying it has none.
    pub fn require_key_slots(&self, what: &str) -> Result<&dyn crate::flow::KeySlots, BrokerError> {
        self.key_slots().ok_or_else(|| self.lacks("per-key concurrency slots", what))
    }

    /// The broker's [`RateBuckets`](crate::flow::RateBuckets), or an error saying it has none.
    pub fn require_rate_buckets(&self, what: &str) -> Result<&dyn crate::flow::RateBuckets, BrokerError> {
        self.rate_buckets().ok_or_else(|| self.lacks("cluster-wide rate limits", what))
    }

    /// The broker's [`FairQueues`](crate::flow::FairQueues), or an error saying it has none.
    pub fn require_fair_queues(&self, what: &str) -> Result<&dyn crate::flow::FairQueues, BrokerError> {
        self.fair_queues().ok_or_else(|| self.lacks("fair queues", what))
    }

    fn lacks(&self, capability: &str, what: &str) -> BrokerError {
        BrokerError::Unsupported { broker: self.kind(), option: format!("{capability} (`{what}`)") }
    }
}

impl dyn ResultBackend {
    /// The backend's [`Chords`], or an error saying it has none.
    pub fn require_chords(&self) -> Result<&dyn Chords, BackendError> {
        self.chords().ok_or(BackendError::Unsupported { backend: self.kind(), what: "chords" })
    }

    /// The backend's [`Claims`], or an error saying it has none.
    pub fn require_claims(&self) -> Result<&dyn Claims, BackendError> {
        self.claims().ok_or(BackendError::Unsupported { backend: self.kind(), what: "idempotency keys" })
    }
}

//! `rpc://`: results sent to the caller's reply queue over AMQP, as Celery's rpc backend does. The
//! worker publishes the result document to the anonymous exchange with routing key = the request's
//! `reply_to` and correlation id = the task id; the caller consumes its own reply queue (named by
//! a UUID, non-durable, auto-delete) and keeps the replies it got, so `AsyncResult::get` needs no
//! Redis. `rpc://` uses the AMQP broker this process connected to (with its TLS options when
//! that is `amqps://`); `rpc://user:pass@host/vhost`
//! names one. As in Celery, results live only in the caller: no chords, no reading another
//! process's results.
//!
//! On a RabbitMQ cluster (a broker URL listing nodes with `;`) both the reply consumer and the
//! publisher fail over to the next node when their connection dies. The reply queue is transient
//! (it cannot be a quorum queue) and lives on the node the caller was connected to: when that
//! node dies, the caller declares it again on the next node, and replies published in between
//! are lost (RabbitMQ drops them as unroutable); use a stored backend when results must survive
//! a node's loss.
//!
//! ```no_run
//! # async fn demo() -> Result<(), celery_core::BackendError> {
//! // Usually "rpc://" beside an amqp:// broker; here with the server named.
//! let backend = result_backends::rpc::RpcBackend::connect("rpc://guest:guest@127.0.0.1:5672/%2f").await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use broker_backends::amqp::error::kind_of;
use broker_backends::amqp::Nodes;
use celery_core::backoff::Reconnect;
use celery_core::scheme::ConnectContext;
use celery_core::sync::lock;
use celery_core::url::ServiceUrl;
use celery_core::{BackendError, ResultBackend, TaskMeta, TaskState};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Notify;

/// [`map_err`](Result::map_err) for a lapin error met while doing `context`: a connection error
/// or an operation error as [`kind_of`] (the broker's classification) says, the lapin error kept
/// as the source.
fn failed(context: &'static str) -> impl FnOnce(lapin::Error) -> BackendError {
    move |e| BackendError::of_kind(kind_of(&e), context, e)
}

/// The AMQP nodes an `rpc://` URL replies over: the server it names (`rpc://user:pass@host/vhost`,
/// with the options of an `amqp://` URL), else the app's broker, which must then be `amqp://` or
/// `amqps://` (a bare `rpc://` takes no options), with every node of a cluster's `;` list.
fn server_nodes(url: &str, ctx: &ConnectContext) -> Result<Nodes, BackendError> {
    let u = ServiceUrl::parse(url)?;
    let Some(rest) = url.strip_prefix("rpc://") else {
        return Err(u.invalid("not an rpc:// URL").into());
    };
    if u.username().is_some() || !matches!(u.location(), "" | "/") {
        return Ok(Nodes::parse(&format!("amqp://{rest}"))?);
    }
    u.finish()?;
    match ctx.broker_url() {
        Some(b) if b.starts_with("amqp://") || b.starts_with("amqps://") => Ok(Nodes::parse(b)?),
        _ => Err(u
            .invalid(
                "rpc:// replies over the AMQP broker: use an amqp:// broker, or name one (rpc://user:pass@host/vhost)",
            )
            .into()),
    }
}

/// How many times a result is published when its connection is lost under it.
const STORE_ATTEMPTS: u32 = 3;

#[derive(Debug)]
struct Inner {
    /// The AMQP server, or a cluster's nodes (printed redacted).
    nodes: Nodes,
    queue: String,
    publish: tokio::sync::Mutex<Option<(Arc<Connection>, Channel)>>,
    replies: Mutex<HashMap<String, TaskMeta>>,
    notify: Notify,
}

/// Results over AMQP replies.
#[derive(Debug, Clone)]
pub struct RpcBackend {
    inner: Arc<Inner>,
}

impl RpcBackend {
    /// Connects to the AMQP server the URL names (`rpc://user:pass@host/vhost`), declares this
    /// process's reply queue and starts consuming it.
    pub async fn connect(url: &str) -> Result<RpcBackend, BackendError> {
        RpcBackend::connect_in(url, &ConnectContext::default()).await
    }

    /// Connects as [`RpcBackend::connect`]; a bare `rpc://` replies over the app's broker, which
    /// `ctx` names ([`App::connect`](celery_core::App::connect) hands it over).
    pub async fn connect_in(url: &str, ctx: &ConnectContext) -> Result<RpcBackend, BackendError> {
        let nodes = server_nodes(url, ctx)?;
        let inner = Arc::new(Inner {
            nodes,
            queue: uuid::Uuid::new_v4().to_string(),
            publish: tokio::sync::Mutex::new(None),
            replies: Mutex::default(),
            notify: Notify::new(),
        });
        let subscription = subscribe(&inner, false).await?;
        tokio::spawn(listen(Arc::downgrade(&inner), subscription));
        Ok(RpcBackend { inner })
    }

    async fn channel(&self) -> Result<Channel, BackendError> {
        let mut guard = self.inner.publish.lock().await;
        if let Some((c, ch)) = guard.as_ref() {
            if c.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
            tracing::warn!("rpc: publishing connection lost; reconnecting");
        }
        let nodes = &self.inner.nodes;
        let conn = if guard.is_some() { nodes.reconnect().await } else { nodes.connect().await };
        let conn = Arc::new(conn?);
        let ch = conn.create_channel().await.map_err(failed("rpc: open the publishing channel"))?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }
}

/// Declares the reply queue and consumes it without acks (the connection lives with the consumer).
/// After a lost connection (`again`) it starts at the next node of a cluster: the queue was
/// transient, and is declared again there.
async fn subscribe(inner: &Inner, again: bool) -> Result<(Connection, lapin::Consumer), BackendError> {
    let conn = if again { inner.nodes.reconnect().await } else { inner.nodes.connect().await };
    let conn = conn?;
    let ch = conn.create_channel().await.map_err(failed("rpc: open the reply channel"))?;
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongLongInt(86_400_000));
    let q = ShortString::try_new(inner.queue.clone()).map_err(|_| BackendError::operation("queue name"))?;
    ch.queue_declare(q.clone(), QueueDeclareOptions { auto_delete: true, ..Default::default() }, args)
        .await
        .map_err(failed("rpc: declare the reply queue"))?;
    let opts = BasicConsumeOptions { no_ack: true, ..Default::default() };
    let consumer = ch.basic_consume(q, "".into(), opts, FieldTable::default()).await;
    let consumer = consumer.map_err(failed("rpc: consume the reply queue"))?;
    Ok((conn, consumer))
}

async fn listen(inner: std::sync::Weak<Inner>, subscription: (Connection, lapin::Consumer)) {
    let (mut _conn, mut consumer) = subscription;
    loop {
        while let Some(item) = consumer.next().await {
            let Some(inner) = inner.upgrade() else { return };
            let Ok(d) = item else { break };
            match TaskMeta::from_slice(&d.data) {
                Ok(meta) => {
                    let mut replies = lock(&inner.replies);
                    let keep = replies.get(&meta.task_id).is_some_and(|m| m.status == TaskState::Success);
                    if !keep {
                        replies.insert(meta.task_id.clone(), meta);
                    }
                    drop(replies);
                    inner.notify.notify_waiters();
                }
                Err(e) => tracing::warn!(error = %e, "rpc: ignoring a reply that is not a result document"),
            }
        }
        let Some(strong) = inner.upgrade() else { return };
        tracing::warn!("rpc: reply consumer lost; resubscribing");
        let mut backoff = Reconnect::default();
        (_conn, consumer) = loop {
            match subscribe(&strong, true).await {
                Ok(s) => break s,
                Err(e) => {
                    backoff.pause("rpc reply consumer", &e).await;
                }
            }
        };
    }
}

#[async_trait]
impl ResultBackend for RpcBackend {
    fn kind(&self) -> &'static str {
        "rpc"
    }

    /// Publishes the document to the request's reply queue (nothing to do without one).
    async fn store(&self, meta: &TaskMeta) -> Result<(), BackendError> {
        let Some(reply_to) = meta.reply_to.as_deref() else { return Ok(()) };
        // Too long for AMQP's 255-byte fields: the state is at fault, storing it again fails again.
        let too_long = |what: &str| BackendError::Malformed(format!("rpc: {what} is longer than AMQP's 255 bytes"));
        let key = ShortString::try_new(reply_to.to_owned()).map_err(|_| too_long("reply_to"))?;
        let id = ShortString::try_new(meta.task_id.clone()).map_err(|_| too_long("the task id"))?;
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(id)
            .with_delivery_mode(1);
        let body = meta.to_vec();
        let mut attempt = 1;
        loop {
            let sent = async {
                let ch = self.channel().await?;
                ch.basic_publish("".into(), key.clone(), BasicPublishOptions::default(), &body, props.clone())
                    .await
                    .map_err(failed("rpc: publish a result"))
            };
            match sent.await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < STORE_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "rpc: result publish interrupted; sending it again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn get(&self, task_id: &str) -> Result<Option<TaskMeta>, BackendError> {
        Ok(lock(&self.inner.replies).get(task_id).cloned())
    }

    async fn wait(&self, task_id: &str, timeout: Duration) -> Result<Option<TaskMeta>, BackendError> {
        let read = || lock(&self.inner.replies).get(task_id).cloned();
        Ok(celery_core::backend::wait_notified(&self.inner.notify, timeout, read).await)
    }

    async fn forget(&self, task_id: &str) -> Result<(), BackendError> {
        lock(&self.inner.replies).remove(task_id);
        Ok(())
    }

    fn reply_to(&self) -> Option<String> {
        Some(self.inner.queue.clone())
    }
}

celery_core::register_backend!("rpc" => with_context RpcBackend::connect_in);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_errors_are_invalid_url_and_redacted() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let amqp = ConnectContext::default().with_broker_url("amqp://guest:s3cret@127.0.0.1:1/%2f");
        for (url, ctx, needle) in [
            ("rpc://guest:s3cret@127.0.0.1:1/%2f?bogus=1", None, "amqp://guest:***@127.0.0.1:1/%2f?bogus=1"),
            ("rpc://guest:s3cret@127.0.0.1:1/%2f?bogus=1", None, "unknown amqp:// option `bogus`"),
            ("rpc://?bogus=1", Some(&amqp), "unknown rpc:// option `bogus` (known: none)"),
            ("rpc:///?bogus=1", Some(&amqp), "unknown rpc:// option `bogus`"),
            ("rpc://", None, "use an amqp:// broker"),
            ("rpcx://guest:s3cret@h/", None, "not an rpc:// URL"),
        ] {
            let ctx = ctx.cloned().unwrap_or_default();
            let e = rt.block_on(RpcBackend::connect_in(url, &ctx)).unwrap_err();
            assert!(matches!(e, BackendError::InvalidUrl { .. }), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && !e.contains("s3cret"), "{url}: {e}");
        }
    }
}

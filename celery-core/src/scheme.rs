//! URL schemes: each backend crate registers the schemes it serves through `inventory`, so
//! [`App::connect`](crate::App::connect) finds them without the core depending on any backend.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::backend::ResultBackend;
use crate::broker::Broker;
use crate::error::{BackendError, BrokerError};

/// A boxed connect future.
pub type ConnectFuture<T, E> = Pin<Box<dyn Future<Output = Result<Arc<T>, E>> + Send>>;

/// A broker scheme (`redis`, `memory`, ...), registered with [`register_broker!`](crate::register_broker).
#[derive(Debug)]
pub struct BrokerScheme {
    /// The URL scheme without `://`.
    pub scheme: &'static str,
    /// Connects to the URL.
    pub connect: fn(String) -> ConnectFuture<dyn Broker, BrokerError>,
}

/// What a result backend's connect may know beyond its own URL, handed over explicitly by
/// [`App::connect`](crate::App::connect) (never through process-global state, so connect order
/// does not matter): `rpc://` with no server of its own replies over the broker's AMQP server.
///
/// ```
/// use celery_core::scheme::ConnectContext;
/// let ctx = ConnectContext::default().with_broker_url("amqp://guest:guest@127.0.0.1:5672//");
/// assert_eq!(ctx.broker_url(), Some("amqp://guest:guest@127.0.0.1:5672//"));
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ConnectContext {
    broker_url: Option<String>,
}

impl ConnectContext {
    /// The same context, naming the broker the app connects to.
    pub fn with_broker_url(mut self, url: impl Into<String>) -> Self {
        self.broker_url = Some(url.into());
        self
    }

    /// The broker's URL, secrets included (for client libraries only; print it through
    /// [`ServiceUrl`](crate::url::ServiceUrl)).
    pub fn broker_url(&self) -> Option<&str> {
        self.broker_url.as_deref()
    }
}

impl std::fmt::Debug for ConnectContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let broker = self.broker_url.as_deref().map(crate::url::redacted);
        f.debug_struct("ConnectContext").field("broker_url", &broker).finish()
    }
}

/// A result-backend scheme.
#[derive(Debug)]
pub struct BackendScheme {
    /// The URL scheme without `://`.
    pub scheme: &'static str,
    /// Connects to the URL.
    pub connect: fn(String, ConnectContext) -> ConnectFuture<dyn ResultBackend, BackendError>,
}

inventory::collect!(BrokerScheme);
inventory::collect!(BackendScheme);

/// Registers broker schemes: each URL scheme listed connects through `$connect(&str)`, an async
/// function returning `Result<impl Broker, BrokerError>`.
///
/// ```ignore
/// celery_core::register_broker!("redis", "rediss" => RedisBroker::connect);
/// ```
#[macro_export]
macro_rules! register_broker {
    ($($scheme:literal),+ $(,)? => $connect:path) => {
        $( $crate::__private::inventory::submit! {
            $crate::scheme::BrokerScheme {
                scheme: $scheme,
                connect: |url| ::std::boxed::Box::pin(async move {
                    let broker = $connect(&url).await?;
                    ::std::result::Result::Ok(::std::sync::Arc::new(broker) as ::std::sync::Arc<dyn $crate::Broker>)
                }),
            }
        } )+
    };
}

/// Registers result-backend schemes: each URL scheme listed connects through `$connect(&str)`, or
/// with `with_context`, `$connect(&str, &ConnectContext)`; an async function returning
/// `Result<impl ResultBackend, BackendError>`.
///
/// ```ignore
/// celery_core::register_backend!("redis", "rediss" => RedisBackend::connect);
/// celery_core::register_backend!("rpc" => with_context RpcBackend::connect_in);
/// ```
#[macro_export]
macro_rules! register_backend {
    ($($scheme:literal),+ $(,)? => with_context $connect:path) => {
        $( $crate::__private::inventory::submit! {
            $crate::scheme::BackendScheme {
                scheme: $scheme,
                connect: |url, ctx| ::std::boxed::Box::pin(async move {
                    let backend = $connect(&url, &ctx).await?;
                    ::std::result::Result::Ok(
                        ::std::sync::Arc::new(backend) as ::std::sync::Arc<dyn $crate::ResultBackend>
                    )
                }),
            }
        } )+
    };
    ($($scheme:literal),+ $(,)? => $connect:path) => {
        $( $crate::__private::inventory::submit! {
            $crate::scheme::BackendScheme {
                scheme: $scheme,
                connect: |url, _ctx| ::std::boxed::Box::pin(async move {
                    let backend = $connect(&url).await?;
                    ::std::result::Result::Ok(
                        ::std::sync::Arc::new(backend) as ::std::sync::Arc<dyn $crate::ResultBackend>
                    )
                }),
            }
        } )+
    };
}

/// The scheme of `url`; a string that is not `SCHEME://...` is an error that does not print it.
fn scheme_of(url: &str) -> Result<String, crate::url::UrlError> {
    crate::url::ServiceUrl::parse(url).map(|u| u.scheme().to_owned())
}

/// Connects the broker for `url` by its scheme.
pub async fn connect_broker(url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    let s = scheme_of(url)?;
    let entry =
        inventory::iter::<BrokerScheme>.into_iter().find(|e| e.scheme == s).ok_or(BrokerError::UnknownScheme(s))?;
    (entry.connect)(url.to_owned()).await
}

/// Connects the result backend for `url` by its scheme, with no context (an `rpc://` URL must
/// then name its server).
pub async fn connect_backend(url: &str) -> Result<Arc<dyn ResultBackend>, BackendError> {
    connect_backend_in(url, ConnectContext::default()).await
}

/// Connects the result backend for `url` by its scheme, within `ctx` (what the app knows).
pub async fn connect_backend_in(url: &str, ctx: ConnectContext) -> Result<Arc<dyn ResultBackend>, BackendError> {
    let s = scheme_of(url)?;
    let entry =
        inventory::iter::<BackendScheme>.into_iter().find(|e| e.scheme == s).ok_or(BackendError::UnknownScheme(s))?;
    (entry.connect)(url.to_owned(), ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_url_without_a_scheme_is_not_printed() {
        let e = connect_broker("guest:s3cret@rabbit").await.unwrap_err().to_string();
        assert!(e.contains("expected SCHEME://") && !e.contains("s3cret"), "{e}");
        let e = connect_backend("guest:s3cret@rabbit").await.unwrap_err().to_string();
        assert!(e.contains("expected SCHEME://") && !e.contains("s3cret"), "{e}");
        let e = connect_broker("nope://guest:s3cret@rabbit").await.unwrap_err().to_string();
        assert_eq!(e, "no broker for scheme `nope` (is its cargo feature enabled?)");
    }
}

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

/// A broker scheme (`redis`, `memory`, ...).
#[derive(Debug)]
pub struct BrokerScheme {
    /// The URL scheme without `://`.
    pub scheme: &'static str,
    /// Connects to the URL.
    pub connect: fn(String) -> ConnectFuture<dyn Broker, BrokerError>,
}

/// A result-backend scheme.
#[derive(Debug)]
pub struct BackendScheme {
    /// The URL scheme without `://`.
    pub scheme: &'static str,
    /// Connects to the URL.
    pub connect: fn(String) -> ConnectFuture<dyn ResultBackend, BackendError>,
}

inventory::collect!(BrokerScheme);
inventory::collect!(BackendScheme);

fn scheme_of(url: &str) -> &str {
    url.split_once("://").map(|(s, _)| s).unwrap_or(url)
}

/// Connects the broker for `url` by its scheme.
pub async fn connect_broker(url: &str) -> Result<Arc<dyn Broker>, BrokerError> {
    let s = scheme_of(url);
    let entry = inventory::iter::<BrokerScheme>
        .into_iter()
        .find(|e| e.scheme == s)
        .ok_or_else(|| BrokerError::UnknownScheme(s.to_owned()))?;
    (entry.connect)(url.to_owned()).await
}

/// Connects the result backend for `url` by its scheme.
pub async fn connect_backend(url: &str) -> Result<Arc<dyn ResultBackend>, BackendError> {
    let s = scheme_of(url);
    let entry = inventory::iter::<BackendScheme>
        .into_iter()
        .find(|e| e.scheme == s)
        .ok_or_else(|| BackendError::UnknownScheme(s.to_owned()))?;
    (entry.connect)(url.to_owned()).await
}

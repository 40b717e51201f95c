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

/// Connects the result backend for `url` by its scheme.
pub async fn connect_backend(url: &str) -> Result<Arc<dyn ResultBackend>, BackendError> {
    let s = scheme_of(url)?;
    let entry =
        inventory::iter::<BackendScheme>.into_iter().find(|e| e.scheme == s).ok_or(BackendError::UnknownScheme(s))?;
    (entry.connect)(url.to_owned()).await
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

//! Connections: a pool for statements (deadpool-postgres, prepared statements cached per
//! connection), single connections for `LISTEN`, and TLS with rustls. Nothing here knows about
//! results or queues: the broker and the result backend both build on it, and both judge driver
//! errors through [`super::error`].

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::error::PgError;
use super::url::{ConnectOptions, TlsOptions};

/// How long a statement waits for a pooled connection before failing as a connection error.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// The TLS side of a connection: none, or rustls verifying the server.
#[derive(Clone)]
pub enum Tls {
    /// Plain TCP.
    None,
    /// TLS with the server's chain and name verified.
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::None => "Tls::None",
            Tls::Rustls(_) => "Tls::Rustls",
        })
    }
}

impl Tls {
    /// rustls with the system's roots and `root_cert`; none without [`TlsOptions`].
    pub fn new(opts: Option<&TlsOptions>, shown: &str) -> Result<Tls, PgError> {
        let Some(opts) = opts else { return Ok(Tls::None) };
        let bad = |reason: String| PgError::InvalidUrl { url: shown.to_owned(), reason };
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = &opts.root_cert {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("sslrootcert {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(bad(format!("sslrootcert {}: no PEM certificate in the file", path.display())));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        if roots.is_empty() {
            return Err(bad(
                "TLS trusts no authority: the system has no certificate store; give sslrootcert=PATH".into()
            ));
        }
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(format!("TLS configuration: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
    }
}

/// A pool of at most `opts.pool_size` connections, opened lazily, checked when taken back.
pub fn pool(opts: &ConnectOptions, tls: &Tls) -> Result<Pool, PgError> {
    let mgr_cfg = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = match tls {
        Tls::None => Manager::from_config(opts.config.clone(), NoTls, mgr_cfg),
        Tls::Rustls(t) => Manager::from_config(opts.config.clone(), t.clone(), mgr_cfg),
    };
    let connect_timeout = opts.config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(10));
    Pool::builder(manager)
        .max_size(opts.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(connect_timeout + Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| PgError::InvalidUrl { url: opts.shown.clone(), reason: format!("pool: {e}") })
}

/// A connection that listens: a dedicated connection that has run `listen` (its `LISTEN`
/// statements), retried with `backoff` (logged as `what`) until both succeed. The notifications
/// arrive on the returned receiver until the connection ends; the caller aborts the driver task
/// when it gives the connection up.
pub async fn listening(
    opts: &ConnectOptions,
    tls: &Tls,
    listen: &str,
    backoff: &mut celery_core::backoff::Reconnect,
    what: &str,
) -> (Client, tokio::task::JoinHandle<()>, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
    loop {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let failed = match dedicated(opts, tls, tx).await {
            Ok((client, driver)) => match client.batch_execute(listen).await {
                Ok(()) => return (client, driver, rx),
                Err(e) => {
                    driver.abort();
                    PgError::driver("listen", e)
                }
            },
            Err(e) => e,
        };
        let d = backoff.next_delay();
        tracing::warn!(error = %failed, retry_in = ?d, "{what}: cannot listen; retrying");
        tokio::time::sleep(d).await;
    }
}

/// One connection of its own (for `LISTEN`), with the server's asynchronous messages
/// (notifications, notices) sent to `messages` until the connection ends.
async fn dedicated(
    opts: &ConnectOptions,
    tls: &Tls,
    messages: tokio::sync::mpsc::UnboundedSender<AsyncMessage>,
) -> Result<(Client, tokio::task::JoinHandle<()>), PgError> {
    match tls {
        Tls::None => {
            let (client, conn) = opts.config.connect(NoTls).await.map_err(PgError::at("connect"))?;
            Ok((client, tokio::spawn(drive(conn, messages))))
        }
        Tls::Rustls(t) => {
            let (client, conn) = opts.config.connect(t.clone()).await.map_err(PgError::at("connect"))?;
            Ok((client, tokio::spawn(drive(conn, messages))))
        }
    }
}

/// Polls a connection, forwarding its asynchronous messages, until it closes.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    messages: tokio::sync::mpsc::UnboundedSender<AsyncMessage>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            Some(Ok(msg)) => {
                if messages.send(msg).is_err() {
                    return;
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "postgresql: connection lost");
                return;
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_checked() {
        let opts = TlsOptions { root_cert: Some("/nonexistent/ca.pem".into()) };
        let e = Tls::new(Some(&opts), "db+postgresql://u@h/db").unwrap_err().to_string();
        assert!(e.contains("sslrootcert /nonexistent/ca.pem"), "{e}");
        assert!(matches!(Tls::new(None, "x").unwrap(), Tls::None));
    }
}

//! TLS for the log server, with rustls (ring): `broker serve --tls-cert --tls-key
//! [--tls-client-ca]` on the server, `log+tls://HOST:PORT?ca_certs=&certfile=&keyfile=` on the client.
//! The client trusts the system's store plus `ca_certs`, and checks the server's name (host name or IP
//! address) against its certificate; with `--tls-client-ca` the server asks every client for a
//! certificate signed by that authority (mutual TLS). The option names are Celery's `broker_use_ssl`
//! keys, as on `amqps://`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

use crate::log::storage::LogError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(what: &str, path: &Path, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> LogError {
    LogError::Tls { context: format!("{what} {}", path.display()), source: e.into() }
}

fn certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, LogError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, path, e))?;
    if certs.is_empty() {
        return Err(bad(what, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>, LogError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| bad(what, path, e))
}

fn tls_err(e: rustls::Error) -> LogError {
    LogError::Tls { context: "TLS configuration".into(), source: e.into() }
}

/// The server side: a certificate and key, and optionally the authority client certificates must
/// be signed by.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use broker_backends::log::{parse_url, serve_tcp, LogStore, ServerTls};
/// let (dir, cfg) = parse_url("log://./celery-data")?;
/// let store = LogStore::open(&dir, cfg)?;
/// let tls = ServerTls::from_pem("server.pem".as_ref(), "server.key".as_ref(), Some("ca.pem".as_ref()))?;
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:7575").await?;
/// serve_tcp(store, listener, Some("s3cret".into()), Some(tls)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads the PEM files; an unreadable file or a key that does not match is an error naming it.
    pub fn from_pem(cert: &Path, key_file: &Path, client_ca: Option<&Path>) -> Result<ServerTls, LogError> {
        let builder =
            ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(tls_err)?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certs("--tls-client-ca", ca)? {
                    roots.add(c).map_err(|e| bad("--tls-client-ca", ca, e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| bad("--tls-client-ca", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs("--tls-cert", cert)?, key("--tls-key", key_file)?)
            .map_err(|e| bad("--tls-cert/--tls-key", cert, e))?;
        Ok(ServerTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) })
    }
}

/// The files a `log+tls://` URL names.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ClientFiles {
    pub(crate) ca_certs: Option<PathBuf>,
    pub(crate) certfile: Option<PathBuf>,
    pub(crate) keyfile: Option<PathBuf>,
}

/// The client side, ready to connect to one server name.
#[derive(Clone)]
pub(crate) struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTls({:?})", self.name)
    }
}

impl ClientTls {
    /// Trusts the system's store and `ca_certs`; presents `certfile`/`keyfile` when given.
    pub(crate) fn new(host: &str, files: &ClientFiles) -> Result<ClientTls, LogError> {
        if files.certfile.is_some() != files.keyfile.is_some() {
            return Err(LogError::Invalid("log+tls://: certfile and keyfile go together".into()));
        }
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(ca) = &files.ca_certs {
            for c in certs("ca_certs", ca)? {
                roots.add(c).map_err(|e| bad("ca_certs", ca, e))?;
            }
        }
        if roots.is_empty() {
            return Err(LogError::Invalid(
                "log+tls:// trusts no authority: the system has no certificate store; give ca_certs=PATH".into(),
            ));
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?
            .with_root_certificates(roots);
        let config = match (&files.certfile, &files.keyfile) {
            (Some(c), Some(k)) => builder
                .with_client_auth_cert(certs("certfile", c)?, key("keyfile", k)?)
                .map_err(|e| bad("certfile", c, e))?,
            _ => builder.with_no_client_auth(),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_owned()).map_err(|e| LogError::Tls {
            context: format!("log+tls://: `{host}` is not a server name"),
            source: e.into(),
        })?;
        Ok(ClientTls { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }

    /// Runs the handshake over a connected stream.
    pub(crate) async fn connect(
        &self,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.connector.connect(self.name.clone(), stream).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let files = ClientFiles { ca_certs: Some("/nonexistent/ca.pem".into()), ..ClientFiles::default() };
        let e = ClientTls::new("localhost", &files).unwrap_err().to_string();
        assert!(e.contains("ca_certs /nonexistent/ca.pem"), "{e}");
        let e = ServerTls::from_pem("/nonexistent/s.pem".as_ref(), "/nonexistent/s.key".as_ref(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert /nonexistent/s.pem"), "{e}");
    }

    #[test]
    fn a_certificate_without_its_key_is_refused() {
        let files = ClientFiles { certfile: Some("/c.pem".into()), ..ClientFiles::default() };
        let e = ClientTls::new("localhost", &files).unwrap_err().to_string();
        assert!(e.contains("certfile and keyfile go together"), "{e}");
    }
}

//! `broker serve` and `broker bench`: the built-in broker's server and its raw append benchmark.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

/// `broker` subcommands.
#[derive(Debug, Subcommand)]
pub enum BrokerCommand {
    /// Serve a data directory over TCP as `log+tcp://HOST:PORT` (and over its unix socket).
    Serve(ServeArgs),
    /// Measure raw append throughput of the log (100-byte records) for each fsync policy.
    Bench(crate::bench::AppendArgs),
}

/// `broker serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data directory.
    #[arg(long, default_value = "./celery-data")]
    pub data: String,
    /// Address to listen on; anything but loopback requires --token.
    #[arg(long, default_value = "127.0.0.1:7575")]
    pub listen: String,
    /// Clients must present this token (`log+tcp://HOST:PORT?token=...`).
    #[arg(long, env = "CELERY_BROKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Serve TLS (`log+tls://`) with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Ask every client for a certificate signed by this PEM authority (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,
    /// Connections served at once (counted from their HELLO); one more is refused with "too many
    /// connections (limit N)".
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections that have not sent their HELLO yet, at most; one more closes the oldest of
    /// them, so silent connections cannot lock clients out.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending: u32,
    /// Seconds a new connection has to present its HELLO (token).
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    pub hello_timeout: f64,
    /// Seconds a connection holding nothing (no consumer, stream member, delivery or pending
    /// request) may stay silent before it is closed; clients reconnect on their next request.
    #[arg(long, default_value_t = 300.0, value_parser = positive_seconds)]
    pub idle_timeout: f64,
    /// Requests of one connection handled at once (result waits and stream polls aside); at the
    /// limit the server stops reading that connection until one is answered.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Result waits and stream polls of one connection waiting at once.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_waits: u32,
    /// MiB of requests of one connection being handled at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub request_buffer_mib: u32,
    /// MiB of answers and deliveries queued for one connection; a client that does not read them
    /// stops being read from.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub reply_buffer_mib: u32,
}

/// A number of seconds above zero (at most a day).
fn positive_seconds(s: &str) -> Result<f64, String> {
    let secs: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if secs > 0.0 && secs <= 86_400.0 {
        Ok(secs)
    } else {
        Err(format!("{s} is not between 0 (excluded) and 86400 seconds"))
    }
}

impl ServeArgs {
    /// The per-connection limits these options set.
    pub fn limits(&self) -> broker_backends::log::ServerLimits {
        broker_backends::log::ServerLimits {
            max_connections: self.max_connections as usize,
            hello_timeout: std::time::Duration::from_secs_f64(self.hello_timeout),
            idle_timeout: std::time::Duration::from_secs_f64(self.idle_timeout),
            max_in_flight: self.max_in_flight as usize,
            max_waits: self.max_waits as usize,
            request_bytes: (self.request_buffer_mib as usize) << 20,
            reply_bytes: (self.reply_buffer_mib as usize) << 20,
            max_pending: self.max_pending as usize,
        }
    }
}

/// `broker serve|bench` (neither connects to a broker first).
pub(super) async fn run(command: BrokerCommand) -> anyhow::Result<ExitCode> {
    match command {
        BrokerCommand::Serve(a) => serve(&a).await?,
        BrokerCommand::Bench(a) => crate::bench::append(&a).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `broker serve`: owns the directory, serves it over TCP until SIGINT/SIGTERM, then checkpoints.
async fn serve(a: &ServeArgs) -> anyhow::Result<()> {
    use broker_backends::log::{parse_url, serve_tcp_with, LogStore, ServerTls};
    let addr: std::net::SocketAddr =
        a.listen.parse().with_context(|| format!("--listen `{}` is not HOST:PORT", a.listen))?;
    if !addr.ip().is_loopback() && a.token.as_deref().unwrap_or("").is_empty() && a.tls_client_ca.is_none() {
        anyhow::bail!("listening on {addr} (not loopback) requires --token (or client certificates: --tls-client-ca)");
    }
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_pem(cert, key, a.tls_client_ca.as_deref())?),
        _ => None,
    };
    let scheme = if tls.is_some() { "log+tls" } else { "log+tcp" };
    let (dir, cfg) = parse_url(&format!("log://{}", a.data))?;
    let store = LogStore::open(&dir, cfg)?;
    store.serve_unix();
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    tracing::info!(data = %dir.display(), %addr, "broker serving {scheme}://{addr}");
    eprintln!("serving {} as {scheme}://{addr}", dir.display());
    tokio::select! {
        _ = serve_tcp_with(store.clone(), listener, a.token.clone(), tls, a.limits()) => {}
        _ = super::shutdown_signal() => {}
    }
    store.sync().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use std::time::Duration;

    fn serve_args(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from([&["celery", "broker", "serve"], args].concat())?;
        match cli.command {
            Command::Broker(BrokerCommand::Serve(a)) => Ok(a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn broker_serve_limits_default_to_the_servers_and_are_checked() {
        let defaults = serve_args(&[]).unwrap().limits();
        assert_eq!(defaults, broker_backends::log::ServerLimits::default());
        let set = serve_args(&["--max-connections", "20", "--idle-timeout", "1.5", "--reply-buffer-mib", "2"])
            .unwrap()
            .limits();
        assert_eq!(
            (set.max_connections, set.idle_timeout, set.reply_bytes),
            (20, Duration::from_millis(1500), 2 << 20)
        );
        assert!(serve_args(&["--max-connections", "0"]).is_err());
        let err = serve_args(&["--hello-timeout", "0"]).unwrap_err().to_string();
        assert!(err.contains("not between 0 (excluded) and 86400 seconds"), "{err}");
    }
}

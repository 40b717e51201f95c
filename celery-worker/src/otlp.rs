//! Exporting the task queue's spans ([`celery_core::trace`]) to an OpenTelemetry collector over
//! OTLP/HTTP (protobuf), the CLI's `--otlp-endpoint` (crate feature `otel`).
//!
//! [`Exporter::start`] builds a tracer provider with a batch span processor (its own thread, a
//! blocking HTTP client) and a `tracing-opentelemetry` layer that exports only the spans of the
//! target [`TARGET`]; [`Exporter::shutdown`] flushes what is buffered (a short-lived `send` relies on
//! it). The resource names the service (`OTEL_SERVICE_NAME`, else the binary's name) and the
//! process id. The usual `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_TIMEOUT`/`_HEADERS` variables apply.
//!
//! ```no_run
//! use tracing_subscriber::layer::SubscriberExt;
//! use tracing_subscriber::util::SubscriberInitExt;
//! # fn demo() -> Result<(), celery_worker::otlp::OtlpError> {
//! let exporter = celery_worker::otlp::Exporter::start("http://127.0.0.1:4318")?;
//! tracing_subscriber::registry().with(exporter.layer()).init();
//! celery_core::trace::enable();
//! // ... run a worker or send tasks ...
//! exporter.shutdown();
//! # Ok(()) }
//! ```

use celery_core::trace::TARGET;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::{FilterFn, Filtered};
use tracing_subscriber::Layer;

/// The longest endpoint URL accepted.
const MAX_ENDPOINT: usize = 2048;

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtlpError {
    /// The endpoint is not an `http://` URL this exporter can reach.
    #[error("--otlp-endpoint `{url}`: {reason}")]
    Endpoint {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The OTLP exporter refused its configuration.
    #[error("cannot build the OTLP exporter")]
    Build(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// The URL spans are posted to: `endpoint` as given when it names a path, else
/// `endpoint/v1/traces` (as `OTEL_EXPORTER_OTLP_ENDPOINT` is read). Only `http://` (a local
/// collector or agent): this build has no TLS client for it.
///
/// ```
/// use celery_worker::otlp::traces_url;
/// assert_eq!(traces_url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
/// assert_eq!(traces_url("http://c:4318/").unwrap(), "http://c:4318/v1/traces");
/// assert_eq!(traces_url("http://c:4318/custom/traces").unwrap(), "http://c:4318/custom/traces");
/// assert!(traces_url("https://c:4318").is_err());
/// assert!(traces_url("c:4318").is_err());
/// ```
pub fn traces_url(endpoint: &str) -> Result<String, OtlpError> {
    let bad = |reason| OtlpError::Endpoint { url: endpoint.to_owned(), reason };
    if endpoint.len() > MAX_ENDPOINT {
        return Err(bad("longer than 2048 bytes"));
    }
    if endpoint.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("contains spaces or control characters"));
    }
    let rest = match endpoint.split_once("://") {
        Some(("http", rest)) => rest,
        Some(("https", _)) => return Err(bad("https is not built in: export to a local collector over http://")),
        _ => return Err(bad("expected http://HOST:PORT")),
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => Ok(format!("{endpoint}/v1/traces")),
        Some((host, "")) if !host.is_empty() => Ok(format!("{endpoint}v1/traces")),
        Some((host, _)) if !host.is_empty() => Ok(endpoint.to_owned()),
        _ => Err(bad("no host")),
    }
}

/// A running OTLP span exporter.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

/// The layer that turns [`TARGET`] spans into OpenTelemetry spans.
pub type OtlpLayer<S> = Filtered<
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    FilterFn<fn(&tracing::Metadata<'_>) -> bool>,
    S,
>;

impl Exporter {
    /// Starts exporting to `endpoint` (see [`traces_url`]); also the global tracer provider (the
    /// queue-wait span is made through it).
    pub fn start(endpoint: &str) -> Result<Exporter, OtlpError> {
        let url = traces_url(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(OtlpError::Build)?;
        let mut resource =
            Resource::builder().with_attribute(KeyValue::new("process.pid", i64::from(std::process::id())));
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name());
        }
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Ok(Exporter { provider })
    }

    /// The `tracing` layer for the subscriber: only the task queue's spans ([`TARGET`]).
    pub fn layer<S>(&self) -> OtlpLayer<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let ours: fn(&tracing::Metadata<'_>) -> bool = |m| m.target() == TARGET;
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("celery"))
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_filter(FilterFn::new(ours))
    }

    /// Exports what is buffered and stops (blocking: call it outside the async runtime, or from a
    /// blocking thread).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the OTLP exporter did not shut down cleanly; some spans may be lost");
        }
    }
}

/// The binary's file name (`demo`, `celery`, ...).
fn service_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "celery".into())
}

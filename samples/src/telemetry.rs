//! Logs and traces of the sample services.
//!
//! - Logs always go to stderr, filtered by `RUST_LOG` (default `info`).
//! - With `OTEL_EXPORTER_OTLP_ENDPOINT` set (e.g. `http://127.0.0.1:4318`), spans also go out over **OTLP**
//!   (HTTP/protobuf, plain `http://`; the standard `OTEL_*` variables apply: `OTEL_SERVICE_NAME`,
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`, ...), batched in
//!   the background and flushed when the service stops. Without it nothing changes.
//!
//! The exported trace of a request is one tree: the server span of the HTTP request, the producer span of each
//! event it enqueued, the relay's send span, the consumer span of each group's handler, and on through the
//! events that handler enqueued — across services, since every span the framework opens takes the id of the
//! OpenTelemetry span ([`OpenTelemetryIdentity`]), so the `traceparent` an event carries names a span the
//! backend has.

use bus_core::trace::{SpanContext, SpanIdentity};
use opentelemetry::trace::{TraceContextExt, TraceFlags, TraceState, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::ConfigError;

/// The variable that turns the OTLP export on (the base URL; traces go to `<it>/v1/traces`).
pub const OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The traces-only endpoint (the full URL), which also turns the export on and wins over [`OTLP_ENDPOINT`].
pub const OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";

/// What [`init`] set up; [`Telemetry::shutdown`] flushes the spans not exported yet.
#[must_use = "call shutdown() before exiting, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered and stops the exporter (at most a few seconds; the blocking flush runs off
    /// the runtime's workers).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "the last spans could not be exported");
        }
    }
}

/// Sets up logging to stderr and, with [`OTLP_ENDPOINT`] (or [`OTLP_TRACES_ENDPOINT`]) set, the OTLP export of spans as service
/// `service_name` (unless `OTEL_SERVICE_NAME` says otherwise). Call it once, first thing in `main`.
///
/// # Errors
/// An endpoint is not a plain `http://` URL with a host and without credentials, or the exporter cannot be
/// built: the error names the variable (never its value, which may carry a token).
pub fn init(service_name: &str) -> Result<Telemetry, ConfigError> {
    // The traces endpoint wins over the base one in the exporter: the error names the one it reads.
    let mut configured = None;
    for variable in [OTLP_ENDPOINT, OTLP_TRACES_ENDPOINT] {
        if let Some(endpoint) = std::env::var(variable).ok().filter(|v| !v.is_empty()) {
            check_endpoint(variable, &endpoint)?;
            configured = Some(variable);
        }
    }
    let Some(variable) = configured else {
        let _ = tracing_subscriber::registry().with(log_layer()).try_init();
        return Ok(Telemetry { provider: None });
    };
    // The exporter reads the endpoint from the variables just checked. Its error would quote the value: not shown.
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|_| {
        ConfigError::new(variable, "the OTLP exporter refused the endpoint or OTEL_EXPORTER_OTLP_* settings")
    })?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build();
    install(&provider);
    Ok(Telemetry { provider: Some(provider) })
}

/// Installs the process's subscriber with the logs to stderr and an OpenTelemetry layer exporting through
/// `provider` (what [`init`] does with the OTLP exporter; a test passes a provider with an in-memory
/// exporter), and makes the framework's spans take the OpenTelemetry ids ([`OpenTelemetryIdentity`]).
/// Does nothing if a subscriber is already installed.
pub fn install(provider: &SdkTracerProvider) {
    let tracer = provider.tracer("integration-events");
    // Spans only, from level INFO, whatever RUST_LOG says of the logs. Log events stay in the logs: they may
    // carry business data (a buyer's name), which a trace backend has no business keeping.
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_location(false).with_filter(
        tracing_subscriber::filter::filter_fn(|meta| meta.is_span() && *meta.level() <= tracing::Level::INFO),
    );
    if tracing_subscriber::registry().with(log_layer()).with(otel).try_init().is_ok() {
        let _ = bus_core::trace::set_span_identity(OpenTelemetryIdentity);
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter)
}

/// Plain `http://` only (the services carry no TLS stack for telemetry), a host, and no credentials in the URL
/// (they belong in `OTEL_EXPORTER_OTLP_HEADERS`); checked as the exporter will read it.
fn check_endpoint(variable: &'static str, endpoint: &str) -> Result<(), ConfigError> {
    let uri: axum::http::Uri =
        endpoint.parse().map_err(|_| ConfigError::new(variable, "is not a URL (e.g. http://127.0.0.1:4318)"))?;
    if uri.scheme_str() != Some("http") {
        return Err(ConfigError::new(
            variable,
            "must be a plain http:// URL (OTLP over HTTP/protobuf, e.g. http://127.0.0.1:4318); put a TLS-terminating collector in between for https",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(ConfigError::new(variable, "has no host"));
    };
    // Anywhere in the value: `user:pa/ss@host` parses as a host `user` and a path.
    if endpoint.contains('@') {
        return Err(ConfigError::new(variable, "must not carry credentials (pass them in OTEL_EXPORTER_OTLP_HEADERS)"));
    }
    if authority.host().is_empty() {
        return Err(ConfigError::new(variable, "has no host"));
    }
    let has_port = authority.as_str().strip_prefix(authority.host()).is_some_and(|rest| rest.starts_with(':'));
    if has_port && authority.port_u16().is_none() {
        return Err(ConfigError::new(variable, "is not a URL: the port is not a number from 0 to 65535"));
    }
    Ok(())
}

/// The framework's spans take the ids of the OpenTelemetry spans `tracing-opentelemetry` makes of them: the
/// parent given by the framework (an event's `traceparent`, an HTTP request's) becomes the OpenTelemetry
/// parent, and the span's own OpenTelemetry id is what the framework propagates.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenTelemetryIdentity;

impl SpanIdentity for OpenTelemetryIdentity {
    fn adopt(&self, span: &tracing::Span, parent: Option<SpanContext>) -> Option<SpanContext> {
        if let Some(parent) = parent {
            let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            let remote = opentelemetry::trace::SpanContext::new(
                parent.trace_id.into(),
                parent.span_id.into(),
                flags,
                true,
                TraceState::NONE,
            );
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote)).ok()?;
        }
        let context = span.context();
        let own = context.span().span_context().clone();
        own.is_valid().then(|| SpanContext {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            sampled: own.is_sampled(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_must_be_plain_http_without_credentials() {
        assert!(check_endpoint(OTLP_ENDPOINT, "http://127.0.0.1:4318").is_ok());
        assert!(check_endpoint(OTLP_TRACES_ENDPOINT, "http://collector:4318/v1/traces").is_ok());
        for (bad, says) in [
            ("https://collector:4318", "plain http://"),
            ("collector:4318", "plain http://"),
            ("http://", "not a URL"),
            (" http://collector:4318", "not a URL"),
            ("http://user:secret@collector:4318", "credentials"),
            ("http://user:pa/secret@collector:4318", "credentials"),
            ("http://collector:99999999/secret", "port"),
        ] {
            let Err(error) = check_endpoint(OTLP_ENDPOINT, bad) else { panic!("{bad:?} accepted") };
            let error = error.to_string();
            assert!(error.contains(OTLP_ENDPOINT) && error.contains(says), "{bad}: {error}");
            assert!(!error.contains("secret"), "the value is never echoed: {error}");
        }
    }
}

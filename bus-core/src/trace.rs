//! W3C trace context for events: one trace from the request that enqueued an event, through the relay and the
//! broker, to the handler and the events it publishes in turn.
//!
//! - The *current* context is task-local ([`scope`], [`current`]): set it around request handling (the samples
//!   do it in an axum middleware from the `traceparent` header) and the framework does the rest.
//! - Enqueueing an event opens a **producer** span, a child of the current context (or of a new trace): its id
//!   goes into the outbox row as the event's `traceparent`, and from there into the AMQP headers.
//! - Handling a delivery opens a **consumer** span, a child of the event's `traceparent`, and makes it current
//!   while the handler runs, so the events the handler publishes are its children.
//!
//! - The relay publishing an event opens a **send** span (kind producer), a child of the event's producer span,
//!   that lasts until the broker confirmed it.
//!
//! Spans are `tracing` spans named `publish` / `send` / `consume` with the fields `otel.kind`, `trace_id`,
//! `span_id`, `parent_span_id`, `event_type`, `event_id` (and `group` for consumers): an OpenTelemetry layer
//! (`tracing-opentelemetry`) or a log subscriber picks them up. Payloads never appear in spans.
//!
//! **Span ids.** By default the framework makes its own (random W3C ids). A telemetry pipeline that exports
//! spans installs a [`SpanIdentity`] ([`set_span_identity`]) so that every span the framework opens takes the id
//! of the span it exports, and the `traceparent` carried by an event names a span that really exists in the
//! trace backend (the sample services do it for OpenTelemetry).

use std::future::Future;
use std::sync::OnceLock;

use crate::error::BusError;
use crate::limits::{MAX_TRACE_LEN, check_text};

/// The W3C trace context carried with an event (`traceparent`, `tracestate`), checked when made: each at most
/// [`MAX_TRACE_LEN`] bytes without control characters. The `traceparent` is kept as given
/// (a foreign one that does not parse simply starts a new trace where a span is opened from it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl TraceContext {
    /// A trace context from its two W3C headers.
    ///
    /// # Errors
    /// [`BusError::InvalidEnvelope`] naming `traceparent` or `tracestate` when it is too long or holds control
    /// characters.
    pub fn new(traceparent: Option<String>, tracestate: Option<String>) -> Result<Self, BusError> {
        if let Some(tp) = &traceparent {
            check_text("traceparent", tp, MAX_TRACE_LEN, true)?;
        }
        if let Some(ts) = &tracestate {
            check_text("tracestate", ts, MAX_TRACE_LEN, true)?;
        }
        Ok(Self { traceparent, tracestate })
    }

    /// The trace context whose parent is `span` (no `tracestate`).
    pub fn of_span(span: &SpanContext) -> Self {
        Self { traceparent: Some(span.traceparent()), tracestate: None }
    }

    /// The W3C `traceparent` header, e.g. `00-<trace id>-<span id>-01`.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// The W3C `tracestate` header.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The span context of the `traceparent`, if it parses.
    pub fn span(&self) -> Option<SpanContext> {
        self.traceparent.as_deref().and_then(SpanContext::parse)
    }
}

/// A W3C span context: trace id, span id, sampled flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    /// The trace (never 0).
    pub trace_id: u128,
    /// This span (never 0).
    pub span_id: u64,
    /// The `sampled` flag.
    pub sampled: bool,
}

fn nonzero_u128() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

impl SpanContext {
    /// The root span of a new trace.
    pub fn root() -> Self {
        Self { trace_id: nonzero_u128(), span_id: nonzero_u64(), sampled: true }
    }

    /// A child span: same trace, new span id.
    pub fn child(&self) -> Self {
        Self { span_id: nonzero_u64(), ..*self }
    }

    /// Parses a `traceparent` header (version 00); `None` if it is not a valid one.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|&t| t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|&s| s != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` header for this span.
    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }

    /// The trace id in hex (32 digits).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id in hex (16 digits).
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// Gives the spans the framework opens the identity of the spans a telemetry pipeline exports (installed once
/// per process with [`set_span_identity`]).
pub trait SpanIdentity: Send + Sync + 'static {
    /// Makes `span`, a `tracing` span the framework has just opened (and not entered yet), a child of `parent`
    /// (`None`: the pipeline's own current span, or a new trace) in the pipeline, and returns the span context
    /// it got there. `None` when the pipeline does not know this span (no such layer in the subscriber): the
    /// framework then makes its own ids.
    fn adopt(&self, span: &tracing::Span, parent: Option<SpanContext>) -> Option<SpanContext>;
}

static IDENTITY: OnceLock<Box<dyn SpanIdentity>> = OnceLock::new();

/// [`set_span_identity`] was already called in this process.
#[derive(Debug, thiserror::Error)]
#[error("a span identity is already installed in this process")]
pub struct IdentityAlreadySet;

/// Installs the process's [`SpanIdentity`]; spans opened from now on take their ids from it.
///
/// # Errors
/// [`IdentityAlreadySet`] when one was installed before (the first stays).
pub fn set_span_identity(identity: impl SpanIdentity) -> Result<(), IdentityAlreadySet> {
    IDENTITY.set(Box::new(identity)).map_err(|_| IdentityAlreadySet)
}

/// Gives `span` (just opened, with the fields `trace_id`, `span_id` and `parent_span_id` declared empty) its
/// span context as a child of `parent` (or a new trace): from the installed [`SpanIdentity`] if it knows the
/// span, else new ids. Records the three fields and returns the context, which is what an event enqueued under
/// this span carries as its `traceparent`.
pub fn open(span: &tracing::Span, parent: Option<SpanContext>) -> SpanContext {
    let own_ids = || parent.map_or_else(SpanContext::root, |p| p.child());
    if span.is_disabled() {
        return own_ids();
    }
    let context = IDENTITY.get().and_then(|i| i.adopt(span, parent)).unwrap_or_else(own_ids);
    span.record("trace_id", tracing::field::display(context.trace_id_hex()));
    span.record("span_id", tracing::field::display(context.span_id_hex()));
    if let Some(parent) = parent {
        span.record("parent_span_id", tracing::field::display(parent.span_id_hex()));
    }
    context
}

tokio::task_local! {
    static CURRENT: SpanContext;
}

/// The current task's span context, if one was set with [`scope`].
pub fn current() -> Option<SpanContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `future` with `context` as the current span context.
pub async fn scope<F: Future>(context: SpanContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_invalid_ones() {
        let root = SpanContext::root();
        assert_eq!(SpanContext::parse(&root.traceparent()), Some(root));
        let child = root.child();
        assert_eq!((child.trace_id, child.sampled), (root.trace_id, root.sampled));
        assert_ne!(child.span_id, root.span_id);
        let w3c = SpanContext::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(w3c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        for bad in [
            "",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
            "00-xyz7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad}");
        }
    }
}

//! The hop breakdown of the end-to-end latency (`BENCH_HOPS=1`): when each event's relay `send` span opened and
//! closed (its confirmation) and when its `consume` span opened, from the framework's own spans. Off by default:
//! recording costs a little on every event, so the figures are measured without it.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// What was seen of one event.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hop {
    pub sent: Option<Instant>,
    pub confirmed: Option<Instant>,
    pub consumed: Option<Instant>,
}

fn hops() -> &'static Mutex<HashMap<uuid::Uuid, Hop>> {
    static HOPS: OnceLock<Mutex<HashMap<uuid::Uuid, Hop>>> = OnceLock::new();
    HOPS.get_or_init(Mutex::default)
}

/// Whether `BENCH_HOPS=1` asked for the breakdown (read once: it is asked on every event).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("BENCH_HOPS").is_ok_and(|v| v == "1"))
}

/// Takes what was recorded so far (and forgets it).
pub fn take() -> HashMap<uuid::Uuid, Hop> {
    std::mem::take(&mut *hops().lock().unwrap_or_else(|p| p.into_inner()))
}

/// The layer that records the hops (only `send` and `consume` spans reach it).
pub fn layer<S: tracing::Subscriber + for<'a> LookupSpan<'a>>() -> impl Layer<S> {
    Recorder.with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        meta.is_span() && matches!(meta.name(), "send" | "consume")
    }))
}

struct Recorder;

struct EventId(Option<uuid::Uuid>);

impl Visit for EventId {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "event_id" {
            self.0 = format!("{value:?}").trim_matches('"').parse().ok();
        }
    }
}

/// The event id of a span, kept in its extensions until it closes.
struct Id(uuid::Uuid);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let now = Instant::now();
        let mut event = EventId(None);
        attrs.record(&mut event);
        let Some(event) = event.0 else { return };
        let mut hops = hops().lock().unwrap_or_else(|p| p.into_inner());
        let hop = hops.entry(event).or_default();
        match attrs.metadata().name() {
            "send" => hop.sent = hop.sent.or(Some(now)),
            _ => hop.consumed = hop.consumed.or(Some(now)),
        }
        drop(hops);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Id(event));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        let now = Instant::now();
        let Some(span) = ctx.span(&id) else { return };
        if span.name() != "send" {
            return;
        }
        let Some(event) = span.extensions().get::<Id>().map(|i| i.0) else { return };
        let mut hops = hops().lock().unwrap_or_else(|p| p.into_inner());
        let hop = hops.entry(event).or_default();
        hop.confirmed = hop.confirmed.or(Some(now));
    }
}

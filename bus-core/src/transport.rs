//! For transport implementors (`bus-inproc`, `bus-rabbitmq`, a bus of your own): what a transport needs and a
//! service author never does.
//!
//! Every transport runs deliveries through one [`Dispatcher`], so they all behave alike: the handler of the
//! event's type is looked up (none: a permanent failure), run inside the consumer span (a child of the
//! envelope's trace context), bounded by the subscription's [`timeout`](crate::Subscription::timeout) (over it:
//! a transient failure), a panic is caught and becomes a transient failure, and the subscription's
//! [`RetryPolicy`] decides from the attempt and the error whether the event is tried again (and when) or
//! dead-lettered. The transport only carries out that [`Verdict`]: acknowledge, schedule the retry, or
//! dead-letter, in its own way.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tracing::Instrument;

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::handler::{DeliveryContext, EnvelopeHandler, HandlerError};
use crate::name::{EventTypeName, GroupName};
use crate::retry::RetryPolicy;
use crate::trace::{self, TraceContext, current, scope};

pub use crate::confirmation::Countdown;
pub use crate::counters::DeliveryCounters;
pub use crate::subscription::SubscriptionSpec;

/// The context of delivery number `attempt` (from 1) of `envelope` to consumer group `group`: what a handler
/// receives (for a transport that runs handlers without a [`Dispatcher`], and for tests of handlers).
pub fn delivery_context(envelope: Arc<Envelope>, attempt: u32, group: GroupName) -> DeliveryContext {
    DeliveryContext::new(envelope, attempt, group)
}

/// A [`Confirmation`](crate::Confirmation) and the sender that answers it (a dropped sender resolves it to
/// [`BusError::ConfirmationLost`](crate::BusError::ConfirmationLost)).
pub fn confirmation_channel() -> (tokio::sync::oneshot::Sender<Result<(), crate::BusError>>, crate::Confirmation) {
    crate::confirmation::channel()
}

/// What comes of one delivery, for the transport to carry out.
#[derive(Debug)]
pub enum Verdict {
    /// The handler succeeded: acknowledge.
    Handled,
    /// A transient failure with attempts left: deliver again as attempt `next_attempt` after `delay`.
    Retry {
        /// The attempt number of the next delivery.
        next_attempt: u32,
        /// How long to wait before it (jitter applied).
        delay: Duration,
        /// Why this attempt failed.
        error: HandlerError,
    },
    /// A permanent failure, or the last attempt failed: dead-letter with the error as the reason.
    DeadLetter(HandlerError),
}

/// Runs the deliveries of one subscription instance: one code path for every transport (see the module docs).
pub struct Dispatcher {
    group: GroupName,
    handlers: BTreeMap<EventTypeName, Arc<dyn EnvelopeHandler>>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("group", &self.group)
            .field("event_types", &self.handlers.keys().collect::<Vec<_>>())
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Dispatcher {
    /// The dispatcher of a validated subscription, with `retry` the policy in force for its group (the
    /// subscription's own, else the bus's).
    pub fn new(spec: &SubscriptionSpec, retry: RetryPolicy) -> Self {
        Self { group: spec.group.clone(), handlers: spec.handlers.clone(), retry, timeout: spec.timeout }
    }

    /// The consumer group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// The event types it handles.
    pub fn event_types(&self) -> impl Iterator<Item = &EventTypeName> {
        self.handlers.keys()
    }

    /// The retry policy it decides with.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Runs delivery `attempt` (1 for the first) of `envelope` and says what to do next.
    pub async fn dispatch(&self, envelope: &Arc<Envelope>, attempt: u32) -> Verdict {
        match self.run(envelope, attempt).await {
            Ok(()) => Verdict::Handled,
            Err(error) if !error.is_permanent() && self.retry.should_retry(attempt) => {
                let next_attempt = attempt + 1;
                Verdict::Retry { next_attempt, delay: self.retry.delay(next_attempt), error }
            }
            Err(error) => Verdict::DeadLetter(error),
        }
    }

    async fn run(&self, envelope: &Arc<Envelope>, attempt: u32) -> Result<(), HandlerError> {
        let Some(handler) = self.handlers.get(envelope.event_type()) else {
            return Err(HandlerError::permanent(format!(
                "group {} has no handler for {}",
                self.group,
                envelope.event_type()
            )));
        };
        let ctx = DeliveryContext::new(envelope.clone(), attempt, self.group.clone());
        let handling = consumer_span(envelope, self.group.as_str(), async {
            match self.timeout {
                None => handler.handle(ctx).await,
                Some(limit) => tokio::time::timeout(limit, handler.handle(ctx))
                    .await
                    .unwrap_or_else(|_| Err(HandlerError::transient(format!("handler timed out after {limit:?}")))),
            }
        });
        AssertUnwindSafe(handling).catch_unwind().await.unwrap_or_else(|panic| {
            Err(HandlerError::transient(format!("handler panicked: {}", panic_message(&*panic))))
        })
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Opens the producer span of an event being enqueued: a child of `parent` (the event's own trace context if it
/// has one, else the current one, else a new trace). Returns the trace context to store with the event.
pub fn producer_span(parent: &TraceContext, event_type: &str, event_id: uuid::Uuid) -> TraceContext {
    let parent = parent.span().or_else(current);
    // Field values are only computed when a subscriber wants the span.
    let span = tracing::info_span!(
        "publish",
        otel.kind = "producer",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        event_type,
        %event_id,
    );
    let context = trace::open(&span, parent);
    let _entered = span.entered();
    tracing::trace!("event enqueued");
    TraceContext::of_span(&context)
}

/// The relay's send span of `envelope` (kind producer, a child of the event's producer span): the relay keeps
/// it open from the publish until the bus's confirmation, and records its outcome with [`send_outcome`].
pub fn send_span(envelope: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "send",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        error = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        event_type = envelope.event_type().as_str(),
        event_id = %envelope.id(),
    );
    if !span.is_disabled() {
        trace::open(&span, envelope.trace().span());
    }
    span
}

/// Records on a [`send_span`] that the publish failed (status `error`, and why); nothing on success (`None`).
pub fn send_outcome(span: &tracing::Span, error: Option<&BusError>) {
    if let Some(error) = error {
        span.record("otel.status_code", "error");
        span.record("error", tracing::field::display(error));
    }
}

/// Runs a handler's `future` inside the consumer span of `envelope` (a child of its `traceparent`, or a new trace),
/// which is also the current context while it runs.
pub async fn consumer_span<F: Future>(envelope: &Envelope, group: &str, future: F) -> F::Output {
    let tracing_span = tracing::info_span!(
        "consume",
        otel.kind = "consumer",
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
        event_type = envelope.event_type().as_str(),
        event_id = %envelope.id(),
        group,
    );
    let context = trace::open(&tracing_span, envelope.trace().span());
    scope(context, future.instrument(tracing_span)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Subscription;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ping {
        n: u32,
    }

    impl crate::IntegrationEvent for Ping {
        const TYPE_NAME: &'static str = "Ping";
    }

    fn envelope(n: u32) -> Arc<Envelope> {
        Arc::new(Envelope::for_event(&Ping { n }).unwrap().build().unwrap())
    }

    fn dispatcher(subscription: Subscription, retry: RetryPolicy) -> Dispatcher {
        Dispatcher::new(&subscription.into_spec().unwrap(), retry)
    }

    #[tokio::test]
    async fn a_verdict_for_every_outcome() {
        let retry = RetryPolicy::exponential(2, Duration::from_millis(10)).with_jitter(0.0);
        let d = dispatcher(
            Subscription::new(GroupName::from_static("g")).on(|e: Ping, _ctx: DeliveryContext| async move {
                match e.n {
                    0 => Ok(()),
                    1 => Err(HandlerError::transient("later")),
                    2 => Err(HandlerError::permanent("never")),
                    _ => panic!("boom {}", e.n),
                }
            }),
            retry,
        );
        assert!(matches!(d.dispatch(&envelope(0), 1).await, Verdict::Handled));
        match d.dispatch(&envelope(1), 1).await {
            Verdict::Retry { next_attempt: 2, delay, .. } => assert_eq!(delay, Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(d.dispatch(&envelope(1), 2).await, Verdict::DeadLetter(e) if !e.is_permanent()));
        assert!(matches!(d.dispatch(&envelope(2), 1).await, Verdict::DeadLetter(e) if e.is_permanent()));
        match d.dispatch(&envelope(3), 1).await {
            Verdict::Retry { error, .. } => assert!(error.to_string().contains("handler panicked: boom 3"), "{error}"),
            other => panic!("{other:?}"),
        }
        let other = Arc::new(Envelope::builder(EventTypeName::new("Pong").unwrap(), b"{}".to_vec()).build().unwrap());
        match d.dispatch(&other, 1).await {
            Verdict::DeadLetter(e) => assert!(e.is_permanent() && e.to_string().contains("no handler for Pong")),
            v => panic!("{v:?}"),
        }
    }

    #[tokio::test]
    async fn a_layer_wraps_every_handler_added_before_it() {
        struct Refuse;
        #[async_trait::async_trait]
        impl EnvelopeHandler for Refuse {
            async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
                Err(HandlerError::permanent(format!("refused {}", ctx.envelope().event_type())))
            }
        }
        let mut seen = Vec::new();
        let d = dispatcher(
            Subscription::new(GroupName::from_static("g"))
                .on(|_e: Ping, _ctx: DeliveryContext| async { Ok(()) })
                .layer(|event_type, _inner| {
                    seen.push(event_type.to_owned());
                    Arc::new(Refuse)
                }),
            RetryPolicy::no_retry(),
        );
        assert_eq!(seen, vec!["Ping".to_owned()]);
        assert!(
            matches!(d.dispatch(&envelope(0), 1).await, Verdict::DeadLetter(e) if e.to_string().contains("refused Ping"))
        );
    }

    #[tokio::test]
    async fn a_handler_over_its_timeout_fails_transiently() {
        let d = dispatcher(
            Subscription::new(GroupName::from_static("g")).timeout(Duration::from_millis(20)).on(
                |_e: Ping, _ctx: DeliveryContext| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Ok(())
                },
            ),
            RetryPolicy::no_retry(),
        );
        match d.dispatch(&envelope(0), 1).await {
            Verdict::DeadLetter(e) => assert!(!e.is_permanent() && e.to_string().contains("timed out"), "{e}"),
            v => panic!("{v:?}"),
        }
    }
}

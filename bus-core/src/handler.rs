//! Handlers: what a consumer group runs for each event.
//!
//! A handler is a plain async fn `async fn(E, DeliveryContext) -> Result<(), HandlerError>` or a type
//! implementing [`Handler<E>`]. Buses see every handler as an [`EnvelopeHandler`], the type-erased form that
//! receives the raw envelope; a typed handler decodes the JSON payload into `E` first (a payload that does not
//! decode is a permanent failure: it can never succeed, so it is dead-lettered at once).
//!
//! Delivery is at least once: a handler may see the same event again (after a crash, a lost ack, a redrive).
//! Handlers whose effects live in a database get exactly-once effects from the inbox (the `outbox` crate);
//! any other side effect must be idempotent.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;

use crate::envelope::Envelope;
use crate::error::BoxError;
use crate::event::IntegrationEvent;
use crate::name::GroupName;

/// Whether a failure is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// May succeed later (a database timeout, a busy dependency): retried per the [`RetryPolicy`](crate::RetryPolicy).
    Transient,
    /// Will never succeed (invalid data, a broken invariant): dead-lettered at once.
    Permanent,
}

/// A failed handling, [transient](Self::transient) (retry) or [permanent](Self::permanent) (dead-letter now).
pub struct HandlerError {
    kind: FailureKind,
    source: BoxError,
}

impl HandlerError {
    /// A failure that may go away: the event is retried with backoff, then dead-lettered.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self { kind: FailureKind::Transient, source: source.into() }
    }

    /// A failure that will not go away: the event is dead-lettered at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self { kind: FailureKind::Permanent, source: source.into() }
    }

    /// Transient or permanent.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    /// True for a permanent failure.
    pub fn is_permanent(&self) -> bool {
        self.kind == FailureKind::Permanent
    }

    /// The underlying error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The underlying error, by value.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError").field("kind", &self.kind).field("source", &self.source).finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
        };
        write!(f, "{kind} failure: {}", self.source)
    }
}

/// Any error is a transient failure, so `?` works in handlers (like axum's error conversion): a database error,
/// a timeout, an I/O error are retried. Say [`HandlerError::permanent`] for the errors that can never succeed.
/// (`HandlerError` is therefore not itself a [`std::error::Error`]; [`HandlerError::into_source`] gives the
/// error inside.)
impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl From<HandlerError> for BoxError {
    fn from(error: HandlerError) -> Self {
        error.to_string().into()
    }
}

/// What a handler knows about the delivery it is handling: the envelope (ids, correlation, trace), the attempt
/// number and the consumer group. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeliveryContext {
    envelope: Arc<Envelope>,
    attempt: u32,
    group: GroupName,
}

impl DeliveryContext {
    /// Builds a context (transports call [`transport::delivery_context`](crate::transport::delivery_context)).
    pub(crate) fn new(envelope: Arc<Envelope>, attempt: u32, group: GroupName) -> Self {
        Self { envelope, attempt, group }
    }
    /// The delivered envelope.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }
    /// The shared envelope.
    pub fn envelope_arc(&self) -> &Arc<Envelope> {
        &self.envelope
    }
    /// The event id: the deduplication key.
    pub fn event_id(&self) -> uuid::Uuid {
        self.envelope.id()
    }
    /// 1 for the first delivery, then 2, 3, ... for retries.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The consumer group handling the event.
    pub fn group(&self) -> &GroupName {
        &self.group
    }
}

/// The type-erased handler that buses run: it receives the raw envelope.
#[async_trait]
pub trait EnvelopeHandler: Send + Sync + 'static {
    /// Handles one delivery. `Ok` means done (the bus acknowledges it); `Err` is retried or dead-lettered
    /// according to its [`FailureKind`].
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError>;
}

/// A handler of typed events `E`. Implemented for every `Fn(E, DeliveryContext) -> impl Future<Output =
/// Result<(), HandlerError>>`, so a plain async fn is a handler.
#[async_trait]
pub trait Handler<E: IntegrationEvent>: Send + Sync + 'static {
    /// Handles one event.
    async fn handle(&self, event: E, ctx: DeliveryContext) -> Result<(), HandlerError>;
}

#[async_trait]
impl<E, F, Fut> Handler<E> for F
where
    E: IntegrationEvent,
    F: Fn(E, DeliveryContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, event: E, ctx: DeliveryContext) -> Result<(), HandlerError> {
        self(event, ctx).await
    }
}

/// Adapts a [`Handler<E>`] to an [`EnvelopeHandler`]: decodes the payload as `E`; a payload that does not decode
/// is a permanent failure naming the type and the serde error.
pub(crate) struct TypedHandler<E, H> {
    handler: H,
    _event: PhantomData<fn(E)>,
}

impl<E, H> TypedHandler<E, H> {
    /// Wraps `handler`.
    pub(crate) fn new(handler: H) -> Self {
        Self { handler, _event: PhantomData }
    }
}

#[async_trait]
impl<E: IntegrationEvent, H: Handler<E>> EnvelopeHandler for TypedHandler<E, H> {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let event: E = ctx
            .envelope()
            .decode()
            .map_err(|e| HandlerError::permanent(format!("payload is not a valid {}: {e}", E::TYPE_NAME)))?;
        self.handler.handle(event, ctx).await
    }
}

//! The [`Envelope`]: one event with the metadata that travels with it.
//!
//! An envelope is immutable once built, and building it enforces every limit: a valid event type name, a
//! payload no bigger than the limit (256 KiB by default), bounded metadata strings without control characters.
//! So a bus or an outbox that holds an `Envelope` never has to re-check it.

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use crate::error::BusError;
use crate::event::IntegrationEvent;
use crate::limits::{DEFAULT_MAX_PAYLOAD_BYTES, MAX_METADATA_LEN, check_payload, check_text};
use crate::name::EventTypeName;
use crate::trace::TraceContext;

/// One event and its metadata, as it travels through the outbox and the bus.
///
/// Invariants (checked by [`EnvelopeBuilder::build`]): the type name matches the CONTRACT pattern, the payload
/// is within the size limit it was built with, metadata strings are at most [`MAX_METADATA_LEN`] bytes of
/// printable characters. Cloning is cheap (the payload is reference-counted).
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    id: Uuid,
    event_type: EventTypeName,
    version: u32,
    occurred_at: DateTime<Utc>,
    correlation_id: String,
    causation_id: Option<Uuid>,
    partition_key: Option<String>,
    source: Option<String>,
    trace: TraceContext,
    sequence: Option<i64>,
    payload: Bytes,
}

impl Envelope {
    /// Starts an envelope for a typed event: serializes it to JSON and takes its type name, version and
    /// partition key. Defaults: a new UUID v7 id, `occurred_at` now, correlation id = the event id.
    ///
    /// # Errors
    /// [`BusError::InvalidName`] if `E::TYPE_NAME` is invalid, [`BusError::Serialize`] if serde fails.
    pub fn for_event<E: IntegrationEvent>(event: &E) -> Result<EnvelopeBuilder, BusError> {
        let event_type = EventTypeName::new(E::TYPE_NAME)?;
        let payload = serde_json::to_vec(event)
            .map_err(|source| BusError::Serialize { event_type: E::TYPE_NAME.to_owned(), source })?;
        Ok(EnvelopeBuilder::new(event_type, Bytes::from(payload))
            .version(E::VERSION)
            .partition_key(event.partition_key()))
    }

    /// Starts an envelope from an already serialized JSON payload (a foreign message, an outbox row).
    pub fn builder(event_type: EventTypeName, payload: impl Into<Bytes>) -> EnvelopeBuilder {
        EnvelopeBuilder::new(event_type, payload.into())
    }

    /// The event id (UUID, v7 when we made it): the deduplication key, AMQP `message_id`.
    pub fn id(&self) -> Uuid {
        self.id
    }
    /// The event type name.
    pub fn event_type(&self) -> &EventTypeName {
        &self.event_type
    }
    /// The payload schema version.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// When the event occurred (millisecond precision).
    pub fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
    /// The id of the request or event that started the flow.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
    /// The id of the event that caused this one, if any.
    pub fn causation_id(&self) -> Option<Uuid> {
        self.causation_id
    }
    /// The partition key: same key, same order.
    pub fn partition_key(&self) -> Option<&str> {
        self.partition_key.as_deref()
    }
    /// The publishing service's name (AMQP `app_id`), if set.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }
    /// The W3C trace context.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }
    /// The event's position in its publisher's outbox (`x-outbox-seq`), once the relay published it.
    pub fn sequence(&self) -> Option<i64> {
        self.sequence
    }
    /// The payload: UTF-8 JSON.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the payload as `E`.
    ///
    /// # Errors
    /// The serde error if the payload is not a valid `E`.
    pub fn decode<E: IntegrationEvent>(&self) -> Result<E, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }

    /// The same envelope with another trace context (the outbox sets the producer span's here); a
    /// [`TraceContext`] is checked when it is made.
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    /// Checks the payload against a limit of `limit` bytes (a bus's or an outbox's own, which may be lower than
    /// the one the envelope was built with).
    ///
    /// # Errors
    /// [`BusError::PayloadTooLarge`] naming the event type and size.
    pub fn check_payload_limit(&self, limit: usize) -> Result<(), BusError> {
        check_payload(self.event_type.as_str(), self.payload.len(), limit)
    }

    /// A builder for an event caused by this one: it carries the correlation id and trace context forward (inside a
    /// handler, the consumer span becomes the parent)
    /// and sets the causation id to this event's id.
    ///
    /// # Errors
    /// As [`Envelope::for_event`].
    pub fn caused<E: IntegrationEvent>(&self, event: &E) -> Result<EnvelopeBuilder, BusError> {
        Ok(Envelope::for_event(event)?
            .correlation_id(self.correlation_id.clone())
            .causation_id(Some(self.id))
            // Inside a handler the current context is the consumer span: the new event is its child.
            .trace(match crate::trace::current() {
                Some(consumer) => TraceContext::of_span(&consumer),
                None => self.trace.clone(),
            }))
    }
}

impl fmt::Debug for Envelope {
    /// Metadata only: the payload is never printed (it may hold personal data), only its size.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("id", &self.id)
            .field("event_type", &self.event_type)
            .field("version", &self.version)
            .field("occurred_at", &self.occurred_at)
            .field("correlation_id", &self.correlation_id)
            .field("causation_id", &self.causation_id)
            .field("partition_key", &self.partition_key)
            .field("source", &self.source)
            .field("sequence", &self.sequence)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

/// Builds an [`Envelope`]; [`build`](Self::build) checks every limit.
#[derive(Clone, Debug)]
#[must_use = "call build() to get the envelope"]
pub struct EnvelopeBuilder {
    id: Option<Uuid>,
    event_type: EventTypeName,
    version: u32,
    occurred_at: Option<DateTime<Utc>>,
    correlation_id: Option<String>,
    causation_id: Option<Uuid>,
    partition_key: Option<String>,
    source: Option<String>,
    trace: TraceContext,
    sequence: Option<i64>,
    payload: Bytes,
    max_payload_bytes: usize,
}

impl EnvelopeBuilder {
    fn new(event_type: EventTypeName, payload: Bytes) -> Self {
        Self {
            id: None,
            event_type,
            version: 1,
            occurred_at: None,
            correlation_id: None,
            causation_id: None,
            partition_key: None,
            source: None,
            trace: TraceContext::default(),
            sequence: None,
            payload,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// Sets the event id (default: a new UUID v7).
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }
    /// Sets the payload schema version (default 1, or `E::VERSION`).
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }
    /// Sets when the event occurred (default: now). Kept at millisecond precision.
    pub fn occurred_at(mut self, at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(at);
        self
    }
    /// Sets the correlation id (default: the event id).
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
    /// Sets the causation id: the id of the event that caused this one.
    pub fn causation_id(mut self, id: Option<Uuid>) -> Self {
        self.causation_id = id;
        self
    }
    /// Sets the partition key.
    pub fn partition_key(mut self, key: Option<String>) -> Self {
        self.partition_key = key;
        self
    }
    /// Sets the publishing service's name.
    pub fn source(mut self, service: impl Into<String>) -> Self {
        self.source = Some(service.into());
        self
    }
    /// The trace context set so far.
    pub fn trace_context(&self) -> &TraceContext {
        &self.trace
    }

    /// Sets the W3C trace context.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }
    /// Sets the outbox sequence number (the relay does this).
    pub fn sequence(mut self, sequence: Option<i64>) -> Self {
        self.sequence = sequence;
        self
    }
    /// Sets the payload limit checked by [`build`](Self::build) (default [`DEFAULT_MAX_PAYLOAD_BYTES`]).
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Checks every limit and builds the envelope.
    ///
    /// # Errors
    /// [`BusError::PayloadTooLarge`] naming the event type and size, or [`BusError::InvalidEnvelope`] naming
    /// the field that is too long or holds control characters.
    pub fn build(self) -> Result<Envelope, BusError> {
        check_payload(self.event_type.as_str(), self.payload.len(), self.max_payload_bytes)?;
        let id = self.id.unwrap_or_else(Uuid::now_v7);
        let correlation_id = self.correlation_id.unwrap_or_else(|| id.to_string());
        check_text("correlation_id", &correlation_id, MAX_METADATA_LEN, false)?;
        if let Some(key) = &self.partition_key {
            check_text("partition_key", key, MAX_METADATA_LEN, false)?;
        }
        if let Some(source) = &self.source {
            check_text("source", source, MAX_METADATA_LEN, false)?;
        }
        Ok(Envelope {
            id,
            event_type: self.event_type,
            version: self.version,
            occurred_at: self.occurred_at.unwrap_or_else(Utc::now).trunc_subsecs(3),
            correlation_id,
            causation_id: self.causation_id,
            partition_key: self.partition_key,
            source: self.source,
            trace: self.trace,
            sequence: self.sequence,
            payload: self.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Big {
        data: String,
    }
    impl IntegrationEvent for Big {
        const TYPE_NAME: &'static str = "Big";
        const VERSION: u32 = 3;
        fn partition_key(&self) -> Option<String> {
            Some("k".into())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct BadName;
    impl IntegrationEvent for BadName {
        const TYPE_NAME: &'static str = "bad name!";
    }

    #[test]
    fn typed_event_round_trips_with_defaults() {
        let env = Envelope::for_event(&Big { data: "x".into() }).unwrap().build().unwrap();
        assert_eq!(env.event_type().as_str(), "Big");
        assert_eq!(env.version(), 3);
        assert_eq!(env.partition_key(), Some("k"));
        assert_eq!(env.correlation_id(), env.id().to_string());
        assert_eq!(env.id().get_version_num(), 7);
        assert_eq!(env.decode::<Big>().unwrap(), Big { data: "x".into() });
    }

    #[test]
    fn oversized_payload_is_refused_with_type_and_size() {
        let event = Big { data: "x".repeat(DEFAULT_MAX_PAYLOAD_BYTES) };
        let err = Envelope::for_event(&event).unwrap().build().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BusError::PayloadTooLarge { size, limit: DEFAULT_MAX_PAYLOAD_BYTES, .. } if size > DEFAULT_MAX_PAYLOAD_BYTES)
        );
        assert!(msg.contains("Big") && msg.contains("262144"), "{msg}");
        // A raised limit lets it through.
        assert!(Envelope::for_event(&event).unwrap().max_payload_bytes(1 << 20).build().is_ok());
    }

    #[test]
    fn invalid_type_name_is_refused() {
        let err = Envelope::for_event(&BadName).unwrap_err();
        assert!(err.to_string().contains("bad name!"), "{err}");
    }

    #[test]
    fn metadata_limits() {
        let b = || Envelope::for_event(&Big { data: String::new() }).unwrap();
        assert!(matches!(
            b().correlation_id("a\nb").build(),
            Err(BusError::InvalidEnvelope { field: "correlation_id", .. })
        ));
        assert!(matches!(
            b().partition_key(Some("k".repeat(201))).build(),
            Err(BusError::InvalidEnvelope { field: "partition_key", .. })
        ));
        assert!(matches!(b().correlation_id("").build(), Err(BusError::InvalidEnvelope { .. })));
    }

    #[test]
    fn caused_carries_correlation_forward() {
        let parent =
            Envelope::for_event(&Big { data: String::new() }).unwrap().correlation_id("req-1").build().unwrap();
        let child = parent.caused(&Big { data: String::new() }).unwrap().build().unwrap();
        assert_eq!(child.correlation_id(), "req-1");
        assert_eq!(child.causation_id(), Some(parent.id()));
    }

    #[test]
    fn debug_never_prints_payload() {
        let env = Envelope::for_event(&Big { data: "secret-card-number".into() }).unwrap().build().unwrap();
        assert!(!format!("{env:?}").contains("secret"));
    }
}

//! Outbox rows as read back from the database, and their conversion to envelopes.

use bus_core::{Envelope, EventTypeName, TraceContext};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::OutboxError;

/// One outbox row, whatever the backend.
#[derive(Clone, Debug)]
#[doc(hidden)]
pub struct OutboxRow {
    pub seq: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub version: i32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: String,
    pub causation_id: Option<Uuid>,
    pub partition_key: Option<String>,
    pub source: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub payload: Vec<u8>,
    pub attempts: i32,
}

impl OutboxRow {
    /// The row just written for `envelope` as `seq`, leased with its first attempt counted (direct dispatch).
    pub(crate) fn leased(seq: i64, envelope: Envelope) -> Self {
        Self {
            seq,
            event_id: envelope.id(),
            event_type: envelope.event_type().as_str().to_owned(),
            version: i32::try_from(envelope.version()).unwrap_or(i32::MAX),
            // PostgreSQL keeps microseconds: the row as a claim would read it back.
            occurred_at: chrono::SubsecRound::trunc_subsecs(envelope.occurred_at(), 6),
            correlation_id: envelope.correlation_id().to_owned(),
            causation_id: envelope.causation_id(),
            partition_key: envelope.partition_key().map(str::to_owned),
            source: envelope.source().map(str::to_owned),
            traceparent: envelope.trace().traceparent().map(str::to_owned),
            tracestate: envelope.trace().tracestate().map(str::to_owned),
            payload: envelope.payload().to_vec(),
            attempts: 1,
        }
    }

    /// Rebuilds the envelope exactly as it was enqueued (the payload limit was checked then).
    pub(crate) fn to_envelope(&self) -> Result<Envelope, OutboxError> {
        self.clone().into_envelope()
    }

    /// [`to_envelope`](Self::to_envelope), moving the payload instead of copying it.
    pub(crate) fn into_envelope(self) -> Result<Envelope, OutboxError> {
        let corrupt = |e: bus_core::BusError| OutboxError::CorruptRow { seq: self.seq, reason: e.to_string() };
        let event_type = EventTypeName::new(&self.event_type).map_err(corrupt)?;
        let version = u32::try_from(self.version).map_err(|_| OutboxError::CorruptRow {
            seq: self.seq,
            reason: format!("negative version {}", self.version),
        })?;
        let mut builder = Envelope::builder(event_type, self.payload)
            .id(self.event_id)
            .version(version)
            .occurred_at(self.occurred_at)
            .correlation_id(self.correlation_id)
            .causation_id(self.causation_id)
            .partition_key(self.partition_key)
            .sequence(Some(self.seq))
            .trace(TraceContext::new(self.traceparent, self.tracestate).map_err(corrupt)?)
            .max_payload_bytes(usize::MAX);
        if let Some(source) = self.source {
            builder = builder.source(source);
        }
        builder.build().map_err(corrupt)
    }
}

/// An event the relay gave up on: kept with its last error until it is re-queued.
#[derive(Clone, Debug)]
pub struct FailedEvent {
    /// The outbox sequence number.
    pub seq: i64,
    /// The event id.
    pub event_id: Uuid,
    /// The event type name.
    pub event_type: String,
    /// Publish attempts made.
    pub attempts: i32,
    /// The event's partition key: while this row is failed, the key is parked (none of its later events is
    /// published).
    pub partition_key: Option<String>,
    /// The last publish error.
    pub last_error: Option<String>,
    /// When the event occurred.
    pub occurred_at: DateTime<Utc>,
}

impl FailedEvent {
    pub(crate) fn from_row(row: OutboxRow, last_error: Option<String>) -> Self {
        Self {
            seq: row.seq,
            event_id: row.event_id,
            event_type: row.event_type,
            attempts: row.attempts,
            partition_key: row.partition_key,
            last_error,
            occurred_at: row.occurred_at,
        }
    }
}

/// Counts of the outbox's rows, for metrics and `busctl outbox status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Rows waiting to be published (in flight and scheduled included).
    pub pending: i64,
    /// Pending rows claimed by a relay right now.
    pub in_flight: i64,
    /// Rows the relay gave up on (listed by `failed`, re-queued by `retry_failed`).
    pub failed: i64,
    /// Published rows still retained for replay.
    pub published: i64,
    /// How long the oldest pending row has been due, in milliseconds (`None` when nothing is due): from its
    /// enqueue, or from its not-before time for a scheduled event.
    pub oldest_pending_ms: Option<i64>,
    /// Partition keys parked behind a `failed` row: none of their later events is published until the failed
    /// row is re-queued (`retry_failed`) or skipped.
    pub parked_keys: i64,
    /// Pending rows scheduled for later (enqueued with a not-before time still to come).
    pub scheduled: i64,
}

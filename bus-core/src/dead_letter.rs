//! Dead letters: events a consumer group gave up on, kept with the reason so they can be inspected and redriven.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::handler::{FailureKind, HandlerError};
use crate::name::GroupName;

/// A message a consumer group could not handle: after its last attempt, or at once for a permanent failure or a
/// message that is not a valid event at all.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The event as it was delivered, or `None` for a message that could not be read as one (no message id,
    /// invalid type, over the size limit, ...; `last_error` says which).
    pub envelope: Option<Envelope>,
    /// The message id as received, if any (the event id for a valid event).
    pub message_id: Option<String>,
    /// The raw body as received.
    pub payload: Bytes,
    /// The consumer group that gave up.
    pub group: GroupName,
    /// The last error, as text (`x-last-error` on RabbitMQ).
    pub last_error: String,
    /// Why it was dead-lettered.
    pub cause: DeadLetterCause,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

/// Why a consumer group gave up on a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterCause {
    /// Every attempt the retry policy allows failed (transiently).
    AttemptsExhausted,
    /// A permanent failure, or a message that is not a valid event: no attempt could succeed.
    Permanent,
}

impl DeadLetterCause {
    /// The cause of giving up after `error`, the last failure (the dispatcher dead-letters a transient failure
    /// only when no attempt is left).
    pub fn of(error: &HandlerError) -> Self {
        match error.kind() {
            FailureKind::Transient => Self::AttemptsExhausted,
            FailureKind::Permanent => Self::Permanent,
        }
    }

    /// As text: `attempts exhausted` or `permanent` (RabbitMQ's `x-dead-letter-cause` header, `busctl dlq list`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts exhausted",
            Self::Permanent => "permanent",
        }
    }

    /// The cause written as [`as_str`](Self::as_str) (anything else reads as permanent).
    pub fn parse(text: &str) -> Self {
        if text == Self::AttemptsExhausted.as_str() { Self::AttemptsExhausted } else { Self::Permanent }
    }
}

/// Listing and redriving a bus's dead letters.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// The dead letters of `group`, oldest first.
    async fn dead_letters(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError>;

    /// Removes the dead letters of `group` (all, or only message `id`) and delivers them to that group again,
    /// attempts counted from 1; other groups do not see them. Returns how many were redriven.
    async fn redrive(&self, group: &GroupName, id: Option<Uuid>) -> Result<usize, BusError>;
}

/// Where a bus whose queues do not outlive its process (the in-process bus) keeps its dead letters, so that a
/// crash loses none: typically the consuming service's own database (`outbox::DeadLetterTable`). A broker with
/// durable dead-letter queues (RabbitMQ) needs none. See [`EventBus::keep_dead_letters`](crate::EventBus::keep_dead_letters).
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Keeps `letter` durably, replacing an earlier dead letter of the same group and message id; `Ok` only
    /// once it is stored.
    async fn keep(&self, letter: &DeadLetter) -> Result<(), BusError>;

    /// The dead letters of `group`, oldest first.
    async fn list(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError>;

    /// Removes `letter` if it is still stored as it was listed (same group, message id and `failed_at`; a newer
    /// dead letter of the same message stays). `true` if it was removed.
    async fn remove(&self, letter: &DeadLetter) -> Result<bool, BusError>;
}

impl DeadLetter {
    /// A dead letter for a valid event.
    pub fn of_event(
        envelope: Envelope,
        group: GroupName,
        last_error: String,
        cause: DeadLetterCause,
        attempts: u32,
    ) -> Self {
        Self {
            message_id: Some(envelope.id().to_string()),
            payload: envelope.payload().clone(),
            envelope: Some(envelope),
            group,
            last_error,
            cause,
            attempts,
            failed_at: Utc::now(),
        }
    }

    /// True if this is message `id`.
    pub fn is(&self, id: Uuid) -> bool {
        self.message_id.as_deref().and_then(|m| Uuid::parse_str(m).ok()) == Some(id)
    }
}

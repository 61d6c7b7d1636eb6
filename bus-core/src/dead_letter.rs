//! Dead letters: events a consumer group gave up on, kept with the reason so they can be inspected and redriven.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::handler::FailureKind;
use crate::name::GroupName;

/// An event a consumer group could not handle: after its last attempt, or at once for a permanent failure.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The event as it was delivered.
    pub envelope: Envelope,
    /// The consumer group that gave up.
    pub group: GroupName,
    /// The last error, as text (`x-last-error` on RabbitMQ).
    pub last_error: String,
    /// Why it was dead-lettered: attempts exhausted (transient) or a permanent failure.
    pub kind: FailureKind,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
}

/// Listing and redriving a bus's dead letters.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// The dead letters of `group`, oldest first.
    async fn dead_letters(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError>;

    /// Removes the dead letters of `group` (all, or only event `id`) and delivers them to that group again,
    /// attempts counted from 1; other groups do not see them. Returns how many were redriven.
    async fn redrive(&self, group: &GroupName, id: Option<Uuid>) -> Result<usize, BusError>;
}

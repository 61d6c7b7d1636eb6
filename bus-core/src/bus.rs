//! The [`EventBus`] trait that every transport implements.

use async_trait::async_trait;

use std::sync::Arc;

use crate::confirmation::Confirmation;
use crate::dead_letter::DeadLetterStore;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::name::GroupName;
use crate::subscription::{Subscription, SubscriptionHandle};

/// A bus that carries envelopes from publishers to consumer groups.
///
/// Semantics every implementation keeps:
/// - **Fan-out and competition**: every consumer group subscribed to an event type gets each event of that type;
///   within a group, one instance handles it.
/// - **Confirmed publish**: `publish` returns once the bus has accepted the envelope for sending (waiting while
///   the bus applies back-pressure); the returned [`Confirmation`] resolves `Ok` only when the bus has taken
///   responsibility for it (a broker confirm). An event that no group would receive is a failure
///   ([`BusError::Unroutable`]), never a silent success.
/// - **At least once** per group: an event is handled, or dead-lettered with its reason, possibly more than once.
/// - **Order per partition key** within a group; no order between different keys or without a key.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Hands one envelope to the bus. Errors here mean it was not taken at all.
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError>;

    /// Hands several envelopes to the bus, in order; each gets its own confirmation (a failed one resolves
    /// `Err`). Implementations may do this faster than one `publish` per envelope.
    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Confirmation> {
        let mut confirmations = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            confirmations.push(self.publish(envelope).await.unwrap_or_else(Confirmation::failed));
        }
        confirmations
    }

    /// Publishes one envelope and waits for its confirmation.
    async fn publish_confirmed(&self, envelope: Envelope) -> Result<(), BusError> {
        self.publish(envelope).await?.await
    }

    /// Starts one instance of a consumer group.
    ///
    /// # Errors
    /// Invalid names or settings ([`Subscription::into_spec`]), a closed bus, or transport trouble.
    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError>;

    /// `Ok` when the bus can carry events right now (for health checks): connected to its broker, not shut
    /// down. Cheap; it does not wait for a reconnection.
    ///
    /// # Errors
    /// [`BusError::Closed`] after shutdown, a transport error while the broker is unreachable.
    async fn health(&self) -> Result<(), BusError>;

    /// Keeps the dead letters of consumer group `group` in `store` from now on, if this bus's own dead letters
    /// would not outlive its process (the in-process bus: then a dead-lettered event counts as done only once
    /// `store` has it, and listing and redriving read `store`). A bus with durable dead-letter queues of its own
    /// ignores it: the default does nothing. Call it before subscribing the group.
    fn keep_dead_letters(&self, group: &GroupName, store: Arc<dyn DeadLetterStore>) {
        let _ = (group, store);
    }
}

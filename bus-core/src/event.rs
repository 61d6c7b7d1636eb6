//! The [`IntegrationEvent`] trait that user event types implement.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// An integration event: a fact one service publishes for others, e.g. `OrderStockConfirmed`.
///
/// The payload is the type's serde JSON form; metadata (id, time, correlation, ...) travels in the
/// [`Envelope`](crate::Envelope), never in the payload. `TYPE_NAME` is checked against the CONTRACT pattern
/// `^[A-Za-z][A-Za-z0-9_.-]{0,199}$` when an envelope is built or a handler is registered, and refused with
/// [`BusError::InvalidName`](crate::BusError::InvalidName) otherwise.
///
/// ```
/// use bus_core::IntegrationEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderStockConfirmed {
///     order_id: uuid::Uuid,
/// }
///
/// impl IntegrationEvent for OrderStockConfirmed {
///     const TYPE_NAME: &'static str = "OrderStockConfirmed";
///     fn partition_key(&self) -> Option<String> {
///         Some(self.order_id.to_string())
///     }
/// }
/// ```
pub trait IntegrationEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The event type name: routing key and `type` property on the wire.
    const TYPE_NAME: &'static str;

    /// The schema version of the payload (`x-event-version`). Defaults to 1.
    const VERSION: u32 = 1;

    /// Events with the same partition key are handled in publish order by each consumer group; events without
    /// one are handled in any order. Defaults to none.
    fn partition_key(&self) -> Option<String> {
        None
    }
}

//! The bus error type.

use thiserror::Error;

/// A boxed error, the source of handler and transport failures.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong when building envelopes, publishing or subscribing.
///
/// Messages name the offending setting, event type or value, never credentials.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BusError {
    /// A name (event type, consumer group) breaks `^[A-Za-z][A-Za-z0-9_.-]{0,199}$`.
    #[error("invalid {what} {name:?}: {reason} (expected ^[A-Za-z][A-Za-z0-9_.-]{{0,199}}$)")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The refused value (cut to 201 characters).
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The serialized payload is bigger than the configured limit.
    #[error("event {event_type} is {size} bytes, over the payload limit of {limit} bytes")]
    PayloadTooLarge {
        /// The event type name.
        event_type: String,
        /// The payload size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },

    /// The event could not be serialized to JSON.
    #[error("event {event_type} could not be serialized: {source}")]
    Serialize {
        /// The event type name.
        event_type: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// An envelope field holds a value the wire format cannot carry (too long, control characters, ...).
    #[error("invalid envelope field {field}: {reason}")]
    InvalidEnvelope {
        /// The field.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// No consumer group subscribes to this event type: the event would be dropped, so publishing fails.
    #[error("event {event_type} is routed to no consumer group (unroutable)")]
    Unroutable {
        /// The event type name.
        event_type: String,
    },

    /// The broker refused the message (publisher confirm nack).
    #[error("the broker refused event {event_id}: {reason}")]
    Nacked {
        /// The event id.
        event_id: uuid::Uuid,
        /// The broker's reason, if any.
        reason: String,
    },

    /// The bus is shut down or shutting down and takes no new work.
    #[error("the bus is closed")]
    Closed,

    /// The bus dropped a confirmation without answering it (e.g. the connection was lost before the broker
    /// confirmed): the event may or may not have been taken, so it must be published again.
    #[error("the confirmation was lost before the bus answered: {0}")]
    ConfirmationLost(String),

    /// A configuration value is invalid; `setting` names it.
    #[error("invalid configuration {setting}: {reason}")]
    InvalidConfig {
        /// The setting's name, e.g. `retry.max_attempts`.
        setting: String,
        /// Why it was refused.
        reason: String,
    },

    /// The transport (broker connection, channel, ...) failed.
    #[error("transport error: {0}")]
    Transport(#[source] BoxError),
}

impl BusError {
    /// Builds an [`BusError::InvalidConfig`].
    pub fn invalid_config(setting: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { setting: setting.into(), reason: reason.into() }
    }
}

//! [`InProcConfig`]: settings of the in-process bus, validated when the bus is built.

use bus_core::{BusError, DEFAULT_MAX_PAYLOAD_BYTES, RetryPolicy};

/// When a publish's [`Confirmation`](bus_core::Confirmation) resolves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConfirmOn {
    /// When every subscribed group has handled the event or dead-lettered it. An in-process bus loses its
    /// queues with the process, so this is what lets an outbox relay keep a row pending until the event is
    /// really done: a crash before that republishes it, and the inbox drops the duplicate. The default.
    #[default]
    Handled,
    /// As soon as the event is queued for every subscribed group (faster; events queued in memory are lost if
    /// the process dies).
    Enqueued,
}

/// Settings of an [`InProcBus`](crate::InProcBus).
#[derive(Clone, Debug)]
pub struct InProcConfig {
    /// Most events a consumer group holds at once (queued, waiting for their key, in retry delay or in
    /// handling). A publisher waits while a group is full: memory stays bounded. Default 10,000.
    pub queue_capacity: usize,
    /// Events one subscription instance handles at once, unless its subscription says otherwise. Default 8.
    pub concurrency: usize,
    /// Retry policy of groups whose subscription sets none.
    pub retry: RetryPolicy,
    /// When confirmations resolve.
    pub confirm_on: ConfirmOn,
    /// Largest payload accepted by `publish`, in bytes. Default 256 KiB.
    pub max_payload_bytes: usize,
    /// How long stopping waits for handlers in progress (a subscription's `shutdown`, and
    /// [`InProcBus::shutdown`](crate::InProcBus::shutdown) after its grace period) before abandoning them: their
    /// futures are dropped (an inbox transaction rolls back) and their events' confirmations fail, with those
    /// of the later events of their keys, so the publisher keeps them all. Default 30 s.
    pub stop_timeout: std::time::Duration,
}

impl Default for InProcConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            concurrency: 8,
            retry: RetryPolicy::default(),
            confirm_on: ConfirmOn::default(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            stop_timeout: std::time::Duration::from_secs(30),
        }
    }
}

impl InProcConfig {
    /// Checks every setting.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming the setting.
    pub fn validate(&self) -> Result<(), BusError> {
        if self.queue_capacity == 0 || self.queue_capacity > 10_000_000 {
            return Err(BusError::invalid_config("queue_capacity", "must be between 1 and 10,000,000"));
        }
        if self.concurrency == 0 || self.concurrency > 10_000 {
            return Err(BusError::invalid_config("concurrency", "must be between 1 and 10,000"));
        }
        if self.stop_timeout.is_zero() || self.stop_timeout > std::time::Duration::from_secs(3600) {
            return Err(BusError::invalid_config("stop_timeout", "must be between 1 ms and 1 hour"));
        }
        if self.max_payload_bytes == 0 {
            return Err(BusError::invalid_config("max_payload_bytes", "must be at least 1"));
        }
        self.retry.validate_for_handlers()
    }
}

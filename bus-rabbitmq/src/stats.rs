//! Counters of the RabbitMQ bus.

pub(crate) use bus_core::transport::DeliveryCounters as Stats;

/// A snapshot of this process's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RabbitStats {
    /// Publishes confirmed by the broker.
    pub published: u64,
    /// Deliveries handled and acknowledged.
    pub handled: u64,
    /// Deliveries sent to the retry queue.
    pub retried: u64,
    /// Deliveries sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
}

impl RabbitStats {
    pub(crate) fn new(stats: &Stats, connections: u64) -> Self {
        let c = stats.stats();
        Self {
            published: c.published,
            handled: c.handled,
            retried: c.retried,
            dead_lettered: c.dead_lettered,
            reconnects: connections.saturating_sub(1),
        }
    }
}

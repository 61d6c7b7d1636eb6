//! Counters of the RabbitMQ bus.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Stats {
    published: AtomicU64,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
}

impl Stats {
    pub(crate) fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn snapshot(&self, connections: u64) -> RabbitStats {
        RabbitStats {
            reconnects: connections.saturating_sub(1),
            published: self.published.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

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

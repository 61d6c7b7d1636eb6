//! [`DeliveryCounters`]: the counters every bus keeps (published, handled, retried, dead-lettered).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a bus updates as events go through it. Cheap (relaxed atomics); read with
/// [`snapshot`](Self::snapshot).
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    published: AtomicU64,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
}

/// A snapshot of [`DeliveryCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    /// Events the bus took responsibility for.
    pub published: u64,
    /// Successful handlings.
    pub handled: u64,
    /// Failed handlings followed by a retry.
    pub retried: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
}

impl DeliveryCounters {
    /// One event published.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }
    /// One handling succeeded.
    pub fn handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }
    /// One failed handling will be retried.
    pub fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
    /// One event was dead-lettered.
    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }
    /// The current values.
    pub fn snapshot(&self) -> DeliveryCounts {
        DeliveryCounts {
            published: self.published.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

//! [`DeliveryCounters`]: the counters every bus keeps (published, handled, retried, dead-lettered), and
//! [`DeliveryStats`], what they read at one moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters a bus updates as events go through it. Cheap (relaxed atomics); read with [`stats`](Self::stats).
///
/// Counters may have a parent ([`with_parent`](Self::with_parent)) that every increment also reaches: a bus keeps
/// its own totals and gives each subscription counters of its own (see
/// [`SubscriptionHandle::stats`](crate::SubscriptionHandle::stats)), so that two services sharing one
/// in-process bus still report their own figures.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    published: AtomicU64,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    parent: Option<Arc<DeliveryCounters>>,
}

/// What [`DeliveryCounters`] read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryStats {
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
    /// Counters whose increments also go to `parent`.
    pub fn with_parent(parent: Arc<DeliveryCounters>) -> Self {
        Self { parent: Some(parent), ..Self::default() }
    }

    /// One event published.
    pub fn count_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.count_published();
        }
    }
    /// One handling succeeded.
    pub fn count_handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.count_handled();
        }
    }
    /// One failed handling will be retried.
    pub fn count_retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.count_retried();
        }
    }
    /// One event was dead-lettered.
    pub fn count_dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.count_dead_lettered();
        }
    }
    /// The current values.
    pub fn stats(&self) -> DeliveryStats {
        DeliveryStats {
            published: self.published.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
        }
    }
}

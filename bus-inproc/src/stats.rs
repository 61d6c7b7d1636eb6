//! Counters of the in-process bus.

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
    pub(crate) fn snapshot(&self, outstanding: usize) -> InProcStats {
        InProcStats {
            published: self.published.load(Ordering::Relaxed),
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            outstanding,
        }
    }
}

/// A snapshot of the bus's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InProcStats {
    /// Events accepted by `publish` (counted once however many groups get them).
    pub published: u64,
    /// Successful handlings, all groups.
    pub handled: u64,
    /// Failed handlings followed by a retry.
    pub retried: u64,
    /// Events dead-lettered, all groups.
    pub dead_lettered: u64,
    /// Jobs accepted and not yet handled or dead-lettered, all groups.
    pub outstanding: usize,
}

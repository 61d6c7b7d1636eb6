//! A relay's counters, readable from anywhere while it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(super) struct Counters {
    pub published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub transport_failures: AtomicU64,
    pub gave_up: AtomicU64,
    pub batches: AtomicU64,
    pub batch_micros: AtomicU64,
    pub cleaned: AtomicU64,
    pub handed_off: AtomicU64,
}

impl Counters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> RelayStats {
        RelayStats {
            published: self.published.load(Ordering::Relaxed),
            publish_failures: self.publish_failures.load(Ordering::Relaxed),
            transport_failures: self.transport_failures.load(Ordering::Relaxed),
            gave_up: self.gave_up.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            batch_micros: self.batch_micros.load(Ordering::Relaxed),
            cleaned: self.cleaned.load(Ordering::Relaxed),
            handed_off: self.handed_off.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Events published and marked.
    pub published: u64,
    /// Publishes the bus refused (each spent an attempt: retried later or given up).
    pub publish_failures: u64,
    /// Publishes stopped by transport trouble (no connection, timeout, closed channel): the rows went back
    /// with no attempt spent.
    pub transport_failures: u64,
    /// Rows that became `failed`: attempts exhausted, a permanent error, or a row that cannot be read back.
    pub gave_up: u64,
    /// Batches published.
    pub batches: u64,
    /// Total time spent in batches (claim → publish → confirm → mark), microseconds.
    pub batch_micros: u64,
    /// Published rows deleted by retention cleanup.
    pub cleaned: u64,
    /// Rows producers of this process handed over right after their commit, without a claim (direct dispatch,
    /// PostgreSQL).
    pub handed_off: u64,
}

/// Reads a relay's counters from anywhere (metrics); see [`RelayHandle::monitor`](super::RelayHandle::monitor).
#[derive(Clone)]
pub struct RelayMonitor {
    pub(super) stats: Arc<Counters>,
}

impl RelayMonitor {
    /// The relay's counters now.
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }
}

impl std::fmt::Debug for RelayMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RelayMonitor").field(&self.stats()).finish()
    }
}

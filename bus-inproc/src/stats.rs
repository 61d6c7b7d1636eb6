//! Counters of the in-process bus.

pub(crate) use bus_core::transport::DeliveryCounters as Stats;

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

impl InProcStats {
    pub(crate) fn new(stats: &Stats, outstanding: usize) -> Self {
        let c = stats.stats();
        Self {
            published: c.published,
            handled: c.handled,
            retried: c.retried,
            dead_lettered: c.dead_lettered,
            outstanding,
        }
    }
}

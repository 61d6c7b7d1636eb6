//! One module per scenario; each returns the figures it measured.

pub mod consumer_inbox;
pub mod e2e_latency;
pub mod inproc_dispatch;
pub mod partitioned_throughput;
pub mod producer_commit_cost;
pub mod relay_rss;
pub mod relay_takeover;
pub mod relay_throughput;
pub mod two_relays;

/// A handler that accepts every delivery and does nothing (scenarios that measure the producer side).
pub struct Discard;

#[async_trait::async_trait]
impl bus_core::EnvelopeHandler for Discard {
    async fn handle(&self, _ctx: bus_core::DeliveryContext) -> Result<(), bus_core::HandlerError> {
        Ok(())
    }
}

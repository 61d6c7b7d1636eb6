//! One module per scenario; each returns the figures it measured.

pub mod consumer_inbox;
pub mod e2e_latency;
pub mod inproc_dispatch;
pub mod partitioned_throughput;
pub mod producer_commit_cost;
pub mod relay_rss;
pub mod relay_throughput;
pub mod two_relays;

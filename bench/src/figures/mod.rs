//! One module per scenario; each returns the figures it measured.

pub mod consumer_inbox;
pub mod inproc_dispatch;
pub mod producer_commit_cost;
pub mod two_relays;

//! [`RelayHandle`]: a running relay, to watch and to stop.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::stats::{Counters, RelayMonitor, RelayStats};

/// A running relay.
pub struct RelayHandle {
    pub(super) stop: CancellationToken,
    pub(super) join: JoinHandle<()>,
    pub(super) stats: Arc<Counters>,
    pub(super) listening: tokio::sync::watch::Receiver<bool>,
}

impl RelayHandle {
    /// Resolves once the relay listens for wake-ups from other processes (PostgreSQL `LISTEN` connected; at
    /// once on SQLite). Until then it finds new events by polling only.
    pub async fn listening(&self) {
        let mut listening = self.listening.clone();
        let _ = listening.wait_for(|l| *l).await;
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// A cloneable view of the relay's counters that outlives this handle (for metrics).
    pub fn monitor(&self) -> RelayMonitor {
        RelayMonitor { stats: self.stats.clone() }
    }

    /// Stops gracefully: the batches in hand are published and marked, the relay gives up its liveness proof
    /// (its remaining rows are free at once), then it returns.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.join.await {
            tracing::error!(%error, "relay task ended abnormally");
        }
    }

    /// Kills the relay where it stands, as a crash would: its liveness proof goes with it (PostgreSQL: the lock
    /// connection is dropped; SQLite: the file lock is released), so other relays take its rows over. For
    /// fault-injection tests.
    pub async fn kill(self) {
        self.join.abort();
        let _ = self.join.await;
    }
}

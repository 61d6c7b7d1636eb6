//! Retention cleanup: deletes published rows past `relay.retention`, in its own task so that a large delete
//! never holds up publishing, lease renewals or claims, and with a bound on the work of one run.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::stats::Counters;
use crate::backend::Backend;
use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::outbox::Outbox;

/// Statements (of `relay.cleanup_batch` rows each) in one cleanup run at most.
pub(super) const STATEMENTS_PER_RUN: usize = 20;

/// When a run hit its bound, the next one starts after this pause instead of a whole `cleanup_interval`.
const BACKLOG_PAUSE: Duration = Duration::from_secs(1);

/// One bounded run: returns how many rows it deleted and whether more may be waiting.
pub(super) async fn run_once<DB: Backend>(
    outbox: &Outbox<DB>,
    config: &RelayConfig,
    stats: &Counters,
) -> Result<(u64, bool), OutboxError> {
    let batch = i64::try_from(config.cleanup_batch).unwrap_or(i64::MAX);
    let mut total = 0;
    for _ in 0..STATEMENTS_PER_RUN {
        let deleted = DB::delete_published(outbox.pool(), outbox.sql(), config.retention, batch).await?;
        total += deleted;
        Counters::add(&stats.cleaned, deleted);
        if deleted < config.cleanup_batch as u64 {
            return Ok((total, false));
        }
    }
    Ok((total, true))
}

/// Runs cleanup every `cleanup_interval` until `stop`.
pub(super) async fn run<DB: Backend>(
    outbox: Outbox<DB>,
    config: RelayConfig,
    stats: Arc<Counters>,
    stop: CancellationToken,
) {
    let mut pause = config.cleanup_interval;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = match run_once(&outbox, &config, &stats).await {
            Ok((0, _)) => config.cleanup_interval,
            Ok((deleted, more)) => {
                tracing::debug!(deleted, more, "outbox retention cleanup");
                if more { BACKLOG_PAUSE } else { config.cleanup_interval }
            }
            Err(error) => {
                tracing::warn!(%error, "outbox retention cleanup failed; trying again later");
                config.cleanup_interval
            }
        };
    }
}

//! Writing a batch's outcomes back (marks, failures, releases), fenced by owner, in a task of its own and
//! retried a few times; rows whose write-back keeps failing are left to their lease (published twice at worst,
//! never lost).

use std::time::Duration;

use futures::future::BoxFuture;

use super::AbortOnDrop;
use super::Relay;
use super::pipeline::Outcomes;
use crate::backend::{Backend, Owner};
use crate::error::OutboxError;

/// Writing a batch's outcome is tried this many times (a database blip must not leave rows to the lease).
const WRITE_TRIES: u32 = 4;

/// A finished write-back.
pub(super) struct Written {
    pub(super) id: u64,
    pub(super) marked: u64,
    pub(super) gave_up: u64,
    /// Every statement succeeded.
    pub(super) ok: bool,
    pub(super) outcomes: Outcomes,
}

/// Runs a write up to [`WRITE_TRIES`] times with a short backoff. `None` when every try failed: the rows then
/// stay leased and go to another relay when the lease ends (published twice at worst, never lost).
async fn retrying<T, F, Fut>(what: &str, mut write: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, OutboxError>>,
{
    let mut pause = Duration::from_millis(100);
    for attempt in 1..=WRITE_TRIES {
        match write().await {
            Ok(done) => return Some(done),
            Err(error) if attempt < WRITE_TRIES => {
                tracing::warn!(%error, attempt, "relay could not {what}; trying again");
                tokio::time::sleep(pause).await;
                pause *= 3;
            }
            Err(error) => {
                tracing::error!(%error, "relay could not {what}; its rows go to another relay when the lease ends")
            }
        }
    }
    None
}

impl<DB: Backend> Relay<DB> {
    /// Writes outcomes back in a task of its own (fenced by owner; failures before releases, so that a failed
    /// row blocks its key before the key's later rows are free).
    pub(super) fn spawn_write(&self, owner: Owner, id: u64, outcomes: Outcomes) -> BoxFuture<'static, Written> {
        let (pool, sql, relay) = (self.outbox.pool().clone(), self.outbox.sql_arc(), self.id);
        // If the task dies, its rows are still no longer held: they go to the lease.
        let kept = outcomes.clone();
        let task = AbortOnDrop(tokio::spawn(async move {
            let (pool, sql) = (&pool, &*sql);
            let mut written = Written { id, marked: 0, gave_up: 0, ok: true, outcomes: Outcomes::default() };
            for failure in &outcomes.failures {
                let done = retrying("record failure", || {
                    DB::record_failure(
                        pool,
                        sql,
                        &owner,
                        failure.seq,
                        &failure.reason,
                        failure.give_up,
                        failure.retry_in,
                    )
                })
                .await;
                match done {
                    Some(true) if failure.give_up => written.gave_up += 1,
                    Some(_) => {}
                    None => written.ok = false,
                }
            }
            if !outcomes.released.is_empty()
                && retrying("release", || DB::release(pool, sql, &owner, &outcomes.released)).await.is_none()
            {
                written.ok = false;
            }
            if !outcomes.published.is_empty() {
                #[cfg(feature = "failpoints")]
                crate::failpoint::crash_point("relay-after-confirm");
                let seqs = &outcomes.published;
                match retrying("mark published", || DB::mark_published(pool, sql, &owner, seqs)).await {
                    Some(marked) => {
                        written.marked = marked;
                        if marked < seqs.len() as u64 {
                            tracing::warn!(
                                %relay, marked, confirmed = seqs.len(),
                                "some confirmed events were no longer this relay's (taken over after a lost lease \
                                 or liveness proof): the other relay publishes them again; consumers' inboxes drop \
                                 the duplicates"
                            );
                        }
                    }
                    None => written.ok = false,
                }
            }
            written.outcomes = outcomes;
            written
        }));
        Box::pin(async move {
            let mut task = task;
            match (&mut task.0).await {
                Ok(written) => written,
                // The write task panicked: its rows stay leased and go to another relay when the lease ends.
                Err(_) => Written { id, marked: 0, gave_up: 0, ok: false, outcomes: kept },
            }
        })
    }
}

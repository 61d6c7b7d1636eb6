//! Claims run in tasks of their own, so that a claim always runs to its end even while the engine awaits
//! something else.

use std::time::Duration;

use futures::future::BoxFuture;

use super::AbortOnDrop;
use crate::backend::{Backend, Owner};
use crate::error::OutboxError;
use crate::outbox::Outbox;
use crate::row::OutboxRow;

/// A claim running in its task.
pub(super) type ClaimFuture = BoxFuture<'static, Result<Vec<OutboxRow>, OutboxError>>;

/// Runs a claim in a task of its own, so that it always runs to its end even while the engine awaits something
/// else: a claim's statement that nobody reads would hold SQLite's write lock (and PostgreSQL's row locks).
pub(super) fn spawn_claim<DB: Backend>(
    outbox: &Outbox<DB>,
    owner: Owner,
    held: Vec<i64>,
    batch: usize,
    bytes: usize,
    lease: Duration,
) -> ClaimFuture {
    let (pool, sql) = (outbox.pool().clone(), outbox.sql_arc());
    let task =
        AbortOnDrop(tokio::spawn(async move { DB::claim(&pool, &sql, &owner, &held, batch, bytes, lease).await }));
    Box::pin(async move {
        let mut task = task;
        match (&mut task.0).await {
            Ok(claimed) => claimed,
            Err(_) => Err(OutboxError::Database(sqlx::Error::WorkerCrashed)),
        }
    })
}

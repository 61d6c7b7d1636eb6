//! PostgreSQL: waking the relays after a commit of the caller's own, without a `NOTIFY` inside that transaction.
//!
//! [`Outbox::enqueue`](crate::Outbox::enqueue) on a connection or transaction of the caller's cannot know when it
//! commits. A `NOTIFY` in the transaction would say it, but PostgreSQL serializes every committing transaction
//! that notified (a global lock from the NOTIFY to the end of the commit: the published peer runs at 0.47× the
//! commits/s of plain SQL on 8 writers because of it). Instead the insert returns its transaction id
//! (`pg_current_xact_id()`), and one task per outbox asks PostgreSQL every millisecond, in one statement for all
//! of them, which of the watched transactions have ended (`pg_xact_status`); once one committed it wakes the
//! relays as a commit through [`Outbox::begin`](crate::Outbox::begin) does (this process's at once, others by
//! the coalesced NOTIFY). The task sleeps while nothing is watched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::sql::Sql;
use crate::wakeup::Wakeup;

/// How often the watched transactions are checked while there are any.
const CHECK_EVERY: Duration = Duration::from_millis(1);

/// The transactions of the caller's own whose commit must wake the relays.
pub(crate) struct CommitWatch {
    pending: Mutex<Vec<u64>>,
    signal: Notify,
    started: AtomicBool,
    stop: CancellationToken,
}

impl CommitWatch {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::default(),
            signal: Notify::new(),
            started: AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// Wakes the relays once transaction `xid` has ended (committed: its rows are visible; rolled back: a wake-up
    /// for nothing).
    pub(crate) fn watch<DB: Backend>(
        self: &Arc<Self>,
        xid: u64,
        pool: &Pool<DB>,
        sql: &Arc<Sql>,
        wakeup: &Arc<Wakeup>,
    ) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).push(xid);
        self.signal.notify_one();
        if !self.started.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(run(self.clone(), pool.clone(), sql.clone(), wakeup.clone()));
                }
                Err(_) => self.started.store(false, Ordering::Release),
            }
        }
    }

    /// Stops the task (the outbox is gone).
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

async fn run<DB: Backend>(watch: Arc<CommitWatch>, pool: Pool<DB>, sql: Arc<Sql>, wakeup: Arc<Wakeup>) {
    loop {
        let watched: Vec<u64> = watch.pending.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if watched.is_empty() {
            tokio::select! {
                () = watch.stop.cancelled() => return,
                () = watch.signal.notified() => continue,
            }
        }
        match DB::ended_transactions(&pool, &watched).await {
            Ok(ended) if !ended.is_empty() => {
                watch.pending.lock().unwrap_or_else(|p| p.into_inner()).retain(|xid| !ended.contains(xid));
                wakeup.committed(&pool, &sql);
            }
            Ok(_) => {}
            Err(error) => {
                // Wake the relays now and let their claims find what committed (or their poll, later).
                tracing::debug!(%error, "could not ask which transactions ended; waking the relays anyway");
                watch.pending.lock().unwrap_or_else(|p| p.into_inner()).retain(|xid| !watched.contains(xid));
                wakeup.committed(&pool, &sql);
                tokio::select! {
                    () = watch.stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
        tokio::select! {
            () = watch.stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

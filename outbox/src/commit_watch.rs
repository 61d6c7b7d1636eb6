//! PostgreSQL: waking the relays after a commit of the caller's own, without a `NOTIFY` inside that transaction.
//!
//! [`Outbox::enqueue`](crate::Outbox::enqueue) on a connection or transaction of the caller's cannot know when it
//! commits. A `NOTIFY` in the transaction would say it, but PostgreSQL serializes every committing transaction
//! that notified (a global lock from the NOTIFY to the end of the commit: the published peer runs at 0.47× the
//! commits/s of plain SQL on 8 writers because of it). Instead the insert returns its transaction id
//! (`pg_current_xact_id()`), and one task per outbox asks PostgreSQL, in one statement for all of them, which of
//! the watched transactions a new snapshot sees as ended (`pg_visible_in_snapshot`: ended and no longer running,
//! so a claim after it sees their rows); then it wakes the relays as a commit through
//! [`Outbox::begin`](crate::Outbox::begin) does (this process's at once, others by the coalesced NOTIFY). It asks
//! every millisecond while a watched transaction is younger than 100 ms, every 20 ms after that (a transaction
//! left open), and sleeps while nothing is watched. Needs PostgreSQL 13 or later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::sql::Sql;
use crate::wakeup::Wakeup;

/// How often the watched transactions are checked while one of them is young, and after.
const CHECK_YOUNG: Duration = Duration::from_millis(1);
const CHECK_OLD: Duration = Duration::from_millis(20);
const YOUNG: Duration = Duration::from_millis(100);

/// The transactions of the caller's own whose commit must wake the relays.
pub(crate) struct CommitWatch {
    /// Transaction id → when it was first watched (one transaction enqueues many events).
    pending: Mutex<HashMap<u64, Instant>>,
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
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(xid).or_insert_with(Instant::now);
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
    // However the task ends (its runtime shut down), the next watch starts a new one.
    struct Restartable<'a>(&'a AtomicBool);
    impl Drop for Restartable<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let _restartable = Restartable(&watch.started);
    loop {
        let (watched, young): (Vec<u64>, bool) = {
            let pending = watch.pending.lock().unwrap_or_else(|p| p.into_inner());
            (pending.keys().copied().collect(), pending.values().any(|since| since.elapsed() < YOUNG))
        };
        if watched.is_empty() {
            tokio::select! {
                () = watch.stop.cancelled() => return,
                () = watch.signal.notified() => continue,
            }
        }
        let mut pause = if young { CHECK_YOUNG } else { CHECK_OLD };
        match DB::ended_transactions(&pool, &watched).await {
            Ok(ended) if !ended.is_empty() => {
                let mut pending = watch.pending.lock().unwrap_or_else(|p| p.into_inner());
                for xid in &ended {
                    pending.remove(xid);
                }
                drop(pending);
                wakeup.committed(&pool, &sql);
            }
            Ok(_) => {}
            Err(error) => {
                // Wake the relays anyway (their claim finds what committed) and ask again a little later.
                tracing::debug!(%error, "could not ask which transactions ended; waking the relays anyway");
                wakeup.committed(&pool, &sql);
                pause = Duration::from_millis(100);
            }
        }
        tokio::select! {
            () = watch.stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

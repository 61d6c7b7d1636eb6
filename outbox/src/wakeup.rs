//! Waking relays after a commit: directly for relays in this process, by a coalesced `NOTIFY` for the others.
//!
//! For the outbox's own transactions ([`Outbox::begin`](crate::Outbox::begin)) the NOTIFY is not sent inside the
//! business transaction: PostgreSQL holds a global lock from NOTIFY to the end of the commit, which serializes
//! committing transactions (−45 % commits/s at 8 writers, measured). It is sent after the commit by one
//! background task, at most once per `notify_interval`: commits in between share the next NOTIFY, so a burst of
//! commits costs a handful of them. [`Outbox::enqueue`](crate::Outbox::enqueue) on a connection or transaction
//! of the caller's own cannot know when that commits: the commit watch (`commit_watch`) learns it from
//! PostgreSQL and then wakes the relays the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use sqlx::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::sql::Sql;

#[doc(hidden)]
pub struct Wakeup {
    relays: Mutex<Vec<Weak<Notify>>>,
    remote: Option<Remote>,
}

struct Remote {
    interval: std::time::Duration,
    dirty: Arc<AtomicBool>,
    signal: Arc<Notify>,
    started: OnceLock<()>,
    stop: CancellationToken,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Wakeup {
    pub(crate) fn new(notify_other_processes: bool, interval: std::time::Duration) -> Self {
        Self {
            relays: Mutex::new(Vec::new()),
            remote: notify_other_processes.then(|| Remote {
                interval,
                dirty: Arc::default(),
                signal: Arc::default(),
                started: OnceLock::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// Registers a relay of this process; it is woken after every commit.
    pub(crate) fn register(&self) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        let mut relays = self.relays.lock().unwrap_or_else(|p| p.into_inner());
        relays.retain(|w| w.strong_count() > 0);
        relays.push(Arc::downgrade(&wake));
        wake
    }

    /// Wakes the relays of this process.
    pub(crate) fn wake_local(&self) {
        for relay in self.relays.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade) {
            relay.notify_one();
        }
    }

    /// Wakes every relay: in this process at once, in others through a coalesced NOTIFY.
    pub(crate) fn committed<DB: Backend>(&self, pool: &Pool<DB>, sql: &Arc<Sql>) {
        self.wake_local();
        let Some(remote) = &self.remote else { return };
        remote.dirty.store(true, Ordering::Release);
        remote.started.get_or_init(|| {
            let (pool, sql, dirty, signal, stop, interval) = (
                pool.clone(),
                sql.clone(),
                remote.dirty.clone(),
                remote.signal.clone(),
                remote.stop.clone(),
                remote.interval,
            );
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = signal.notified() => {}
                        }
                        while dirty.swap(false, Ordering::AcqRel) {
                            if let Err(error) = DB::notify(&pool, &sql).await {
                                // Relays poll as a fallback: a lost NOTIFY only delays.
                                tracing::debug!(%error, "outbox NOTIFY failed");
                            }
                            // Debounce: commits during this pause share the next NOTIFY.
                            tokio::select! {
                                () = stop.cancelled() => return,
                                () = tokio::time::sleep(interval) => {}
                            }
                        }
                    }
                });
            }
        });
        remote.signal.notify_one();
    }
}

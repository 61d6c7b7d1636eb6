//! A relay's proof that it is alive, kept by a task of its own so that a busy engine (or a SQLite write lock
//! held by someone else) never delays it: PostgreSQL holds a session advisory lock on a connection of its own
//! and pings it every second; SQLite holds a lock on a file of its own and, every 250 ms, forgets the relays whose
//! lock is free (their rows are then free).
//!
//! The engine reads the current [`Owner`] (none while the proof is lost) and how fresh the last proof is: when
//! the proof is getting old, others may soon take the relay's rows, so it stops claiming and sending until the
//! proof is fresh again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backend::{Backend, Owner};
use crate::outbox::Outbox;
use crate::sql::{Dialect, SQLITE_PROOF_INTERVAL_MS};

/// When the last proof succeeded, in milliseconds since the clock's start.
pub(super) struct ProofClock {
    start: Instant,
    last: AtomicU64,
}

impl ProofClock {
    fn new() -> Self {
        Self { start: Instant::now(), last: AtomicU64::new(0) }
    }

    fn beat(&self) {
        self.last.store(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether the last proof is recent enough to act on (claim, send).
    pub fn fresh(&self) -> bool {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(self.last.load(Ordering::Relaxed)) < stale_after_ms()
    }
}

fn every<DB: Backend>() -> Duration {
    match DB::dialect() {
        Dialect::Postgres => Duration::from_secs(1),
        Dialect::Sqlite => Duration::from_millis(SQLITE_PROOF_INTERVAL_MS.unsigned_abs()),
    }
}

/// Past this age the relay stops claiming and sending: a proof that cannot be renewed (a PostgreSQL ping that
/// hangs) may be lost already.
fn stale_after_ms() -> u64 {
    1_500
}

/// Starts the liveness task of relay `relay`; it gives the proof up when `stop` is cancelled (its rows are free
/// at once) and loses it with the process.
pub(super) fn spawn<DB: Backend>(
    outbox: Outbox<DB>,
    relay: Uuid,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Option<Owner>>, Arc<ProofClock>) {
    let (owner, watching) = watch::channel(None);
    let clock = Arc::new(ProofClock::new());
    let beat = clock.clone();
    let task = tokio::spawn(async move {
        let (pool, sql) = (outbox.pool(), outbox.sql());
        while !stop.is_cancelled() {
            let holding = tokio::select! {
                () = stop.cancelled() => return,
                holding = DB::hold_ownership(pool, sql, relay) => holding,
            };
            let mut held = match holding {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(%relay, %error, "relay cannot prove it is alive; it claims nothing until it can");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            tracing::debug!(%relay, owner = ?held.owner, "relay holds its liveness proof");
            beat.beat();
            owner.send_replace(Some(held.owner));
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        owner.send_replace(None);
                        DB::drop_ownership(pool, sql, held).await;
                        return;
                    }
                    () = tokio::time::sleep(every::<DB>()) => {}
                }
                match DB::keep_ownership(pool, sql, &mut held).await {
                    Ok(()) => beat.beat(),
                    Err(error) => {
                        tracing::warn!(%relay, %error, "relay lost its liveness proof: others may take its rows over; it claims nothing until it holds a new one");
                        owner.send_replace(None);
                        DB::drop_ownership(pool, sql, held).await;
                        break;
                    }
                }
            }
        }
    });
    (task, watching, clock)
}

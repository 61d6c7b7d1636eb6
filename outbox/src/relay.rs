//! The [`Relay`]: publishes committed outbox rows to an [`EventBus`] and marks them published only after the bus
//! confirmed them.
//!
//! # What it guarantees
//! - **No loss.** A row stays pending until the bus confirmed its event. A relay that dies between publishing and
//!   marking leaves its rows leased; the lease expires and a relay (another, or itself restarted) publishes them
//!   again. So an event may be published twice, never zero times: the consumers' inbox drops the duplicate.
//! - **No hot loop, no silent drop.** A failed publish is retried with backoff (`next_attempt_at`); after the
//!   configured attempts the row becomes `failed`: kept, counted, listed by [`Outbox::failed`] and re-queued by
//!   [`Outbox::retry_failed`].
//! - **Order per partition key, across relays.** A row is claimed only when every earlier pending row with its
//!   key is in the same claim or already in flight at this relay, so one relay at a time has a key in flight and
//!   publishes its rows in outbox order (a relay keeps up to two batches in flight, sent one after the other). Limits: a failed publish of a keyed event lets later events of its key, already sent in the same
//!   batch, arrive first; a row that became `failed` gives up its place; events with the same key enqueued by
//!   concurrent transactions are ordered by insertion, not commit (write the business row first).
//! - **Several relays, no duplicates** in normal operation: claims use `FOR UPDATE SKIP LOCKED` and leases on
//!   PostgreSQL, a single `UPDATE … RETURNING` on SQLite.
//! - **Prompt.** It wakes when a producer in this process commits, on a PostgreSQL NOTIFY from other processes,
//!   and polls as a fallback; it keeps claiming without waiting while there is a backlog.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus_core::{BusError, EventBus};
use futures::StreamExt;
use futures::future::join_all;
use futures::stream::FuturesOrdered;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backend::Backend;
use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::outbox::Outbox;

/// Batches in flight at once in [`Relay::run`].
const PIPELINE: usize = 2;

/// A claimed batch handed to the bus, waiting for its confirmations.
struct InFlight {
    rows: Vec<crate::row::OutboxRow>,
    seqs: Vec<i64>,
    confirmations: Vec<bus_core::Confirmation>,
    claimed: usize,
    claimed_at: Instant,
    claimed_in: Duration,
    lease_until: Instant,
}

/// Publishes an outbox's rows to a bus. Build it with [`Outbox::relay`], start it with [`spawn`](Self::spawn).
pub struct Relay<DB: Backend> {
    outbox: Outbox<DB>,
    bus: Arc<dyn EventBus>,
    config: RelayConfig,
    id: Uuid,
    wake: Arc<Notify>,
    stats: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    publish_failures: AtomicU64,
    gave_up: AtomicU64,
    batches: AtomicU64,
    batch_micros: AtomicU64,
    cleaned: AtomicU64,
}

/// A snapshot of a relay's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Events published and marked.
    pub published: u64,
    /// Publish attempts that failed (each is retried later or given up).
    pub publish_failures: u64,
    /// Rows that became `failed` after their last attempt (or at once, for a row that cannot be read back).
    pub gave_up: u64,
    /// Batches published.
    pub batches: u64,
    /// Total time spent in batches (claim → publish → confirm → mark), microseconds.
    pub batch_micros: u64,
    /// Published rows deleted by retention cleanup.
    pub cleaned: u64,
}

impl<DB: Backend> Relay<DB> {
    pub(crate) fn new(outbox: Outbox<DB>, bus: Arc<dyn EventBus>, config: RelayConfig) -> Result<Self, OutboxError> {
        config.validate()?;
        let wake = outbox.register_relay();
        Ok(Self { outbox, bus, config, id: Uuid::new_v4(), wake, stats: Arc::default() })
    }

    /// This relay's id (the lease owner written in claimed rows).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        snapshot(&self.stats)
    }

    /// One cycle: claim a batch, publish it with every confirmation in flight, mark what the bus confirmed,
    /// record failures. Returns how many rows were claimed (0: nothing to do now).
    pub async fn run_once(&self) -> Result<usize, OutboxError> {
        match self.start_batch().await? {
            Some(batch) => self.finish(batch).await,
            None => Ok(0),
        }
    }

    /// Runs `work` while renewing the lease on `claimed` every third of the lease, so that no other relay takes
    /// over a batch that is merely slow (which would publish it twice). Returns the output and when the lease
    /// (as last renewed) ends.
    async fn leased<F: std::future::Future>(
        &self,
        claimed: &[i64],
        lease_until: Instant,
        work: F,
    ) -> (F::Output, Instant) {
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        let mut lease_until = lease_until;
        let every = self.config.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                output = &mut work => return (output, lease_until),
                _ = renew.tick() => match DB::renew_lease(pool, sql, self.id, claimed, self.config.lease).await {
                    Ok(held) if held < claimed.len() as u64 => tracing::warn!(
                        relay = %self.id, held, claimed = claimed.len(),
                        "lease lost on part of a batch (expired before renewal): those events may be published twice"
                    ),
                    Ok(_) => lease_until = Instant::now() + self.config.lease,
                    Err(error) => tracing::warn!(relay = %self.id, %error, "lease renewal failed"),
                },
            }
        }
    }

    /// Claims a batch and hands it to the bus; the confirmations are awaited by [`finish`](Self::finish).
    async fn start_batch(&self) -> Result<Option<InFlight>, OutboxError> {
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        let claimed_at = Instant::now();
        let rows = DB::claim(pool, sql, self.id, self.config.batch_size, self.config.lease).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let claimed_in = claimed_at.elapsed();
        let claimed = rows.len();
        let mut envelopes = Vec::with_capacity(rows.len());
        let mut sent = Vec::with_capacity(rows.len());
        for row in rows {
            match row.to_envelope() {
                Ok(envelope) => {
                    envelopes.push(envelope);
                    sent.push(row);
                }
                Err(error) => {
                    tracing::error!(seq = row.seq, %error, "outbox row cannot be published; marked failed");
                    self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                    DB::record_failure(pool, sql, row.seq, &error.to_string(), true, Duration::ZERO).await?;
                }
            }
        }
        let seqs: Vec<i64> = sent.iter().map(|r| r.seq).collect();
        let (confirmations, lease_until) =
            self.leased(&seqs, claimed_at + self.config.lease, self.bus.publish_batch(envelopes)).await;
        Ok(Some(InFlight { rows: sent, seqs, confirmations, claimed, claimed_at, claimed_in, lease_until }))
    }

    /// Awaits a batch's confirmations (each at most `confirm_timeout`), marks what the bus confirmed and records
    /// the failures. Returns how many rows the batch claimed.
    async fn finish(&self, batch: InFlight) -> Result<usize, OutboxError> {
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        let InFlight { rows, seqs, confirmations, claimed, claimed_at, claimed_in, lease_until } = batch;
        let deadline = tokio::time::Instant::now() + self.config.confirm_timeout;
        let waiting = join_all(confirmations.into_iter().map(|c| async move {
            tokio::time::timeout_at(deadline, c)
                .await
                .unwrap_or_else(|_| Err(BusError::ConfirmationLost("no confirmation within confirm_timeout".into())))
        }));
        let (results, lease_until) = self.leased(&seqs, lease_until, waiting).await;
        let confirmed_in = claimed_at.elapsed() - claimed_in;
        let mut published = Vec::with_capacity(rows.len());
        let mut failures = Vec::new();
        for (row, result) in rows.into_iter().zip(results) {
            match result {
                Ok(()) => published.push(row.seq),
                Err(error) => failures.push((row, error)),
            }
        }
        if !published.is_empty() {
            #[cfg(feature = "failpoints")]
            crate::failpoint::crash_point("relay-after-confirm");
            DB::mark_published(pool, sql, &published).await?;
            if Instant::now() > lease_until {
                tracing::warn!(
                    relay = %self.id,
                    events = published.len(),
                    "batch outlived its lease (the database was slow to answer): another relay may have published \
                     these events too; consumers' inboxes drop such duplicates. Consider a longer relay.lease"
                );
            }
            self.stats.published.fetch_add(published.len() as u64, Ordering::Relaxed);
        }
        for (row, error) in failures {
            self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
            let attempts = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
            let give_up = !self.config.retry.should_retry(attempts);
            let retry_in = self.config.retry.delay(attempts + 1);
            if give_up {
                self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(seq = row.seq, event_id = %row.event_id, attempts, %error, "publish failed for the last time; event marked failed");
            } else {
                tracing::warn!(seq = row.seq, event_id = %row.event_id, attempts, ?retry_in, %error, "publish failed; will retry");
            }
            DB::record_failure(pool, sql, row.seq, &error.to_string(), give_up, retry_in).await?;
        }
        tracing::debug!(
            relay = %self.id,
            rows = claimed,
            claim_ms = claimed_in.as_secs_f64() * 1e3,
            publish_and_confirm_ms = confirmed_in.as_secs_f64() * 1e3,
            total_ms = claimed_at.elapsed().as_secs_f64() * 1e3,
            "batch published"
        );
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .batch_micros
            .fetch_add(u64::try_from(claimed_at.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        Ok(claimed)
    }

    fn report(&self, done: Result<usize, OutboxError>, error_backoff: &mut Duration) {
        match done {
            Ok(_) => *error_backoff = Duration::from_millis(100),
            // The rows stay leased and are published again when the lease ends.
            Err(error) => {
                tracing::warn!(relay = %self.id, %error, "relay batch failed; its rows are retried after the lease")
            }
        }
    }

    /// Deletes published rows older than the retention window, in small batches. Returns how many.
    pub async fn cleanup(&self) -> Result<u64, OutboxError> {
        let batch = i64::try_from(self.config.cleanup_batch).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted =
                DB::delete_published(self.outbox.pool(), self.outbox.sql(), self.config.retention, batch).await?;
            total += deleted;
            if deleted < self.config.cleanup_batch as u64 {
                break;
            }
        }
        self.stats.cleaned.fetch_add(total, Ordering::Relaxed);
        Ok(total)
    }

    /// Runs until `stop` is cancelled, then returns after finishing the batch in hand.
    pub async fn run(self, stop: CancellationToken) {
        self.run_reporting(stop, tokio::sync::watch::channel(false).0).await;
    }

    async fn run_reporting(self, stop: CancellationToken, listening: tokio::sync::watch::Sender<bool>) {
        let listener = {
            let (pool, sql, wake, stop) =
                (self.outbox.pool().clone(), self.outbox.sql_arc(), self.wake.clone(), stop.child_token());
            tokio::spawn(async move { DB::listen(&pool, &sql, wake, listening, stop).await })
        };
        tracing::info!(relay = %self.id, table = %self.outbox.sql().outbox, "relay started");
        let mut error_backoff = Duration::from_millis(100);
        let mut next_cleanup = Instant::now() + self.config.cleanup_interval;
        // Up to PIPELINE batches in flight: the next batch is claimed and published while the previous one waits
        // for its confirmations. A claim is never cancelled half-way (its rows would stay leased), so finished
        // batches are collected while it runs.
        let mut in_flight = FuturesOrdered::new();
        while !stop.is_cancelled() {
            if in_flight.len() >= PIPELINE {
                if let Some(done) = in_flight.next().await {
                    self.report(done, &mut error_backoff);
                }
                continue;
            }
            let starting = self.start_batch();
            tokio::pin!(starting);
            let started = loop {
                tokio::select! {
                    started = &mut starting => break started,
                    Some(done) = in_flight.next(), if !in_flight.is_empty() => self.report(done, &mut error_backoff),
                }
            };
            match started {
                Ok(Some(batch)) => in_flight.push_back(self.finish(batch)),
                Ok(None) => {
                    // Nothing claimable now: wait for a wake-up, the poll, or a batch to finish.
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        Some(done) = in_flight.next(), if !in_flight.is_empty() => self.report(done, &mut error_backoff),
                    }
                }
                Err(error) => {
                    tracing::warn!(relay = %self.id, %error, ?error_backoff, "relay claim failed; retrying");
                    let pause = tokio::time::sleep(error_backoff);
                    tokio::pin!(pause);
                    // Keep finishing the batches in flight (marks, lease renewals) while pausing.
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = &mut pause => break,
                            Some(done) = in_flight.next(), if !in_flight.is_empty() => self.report(done, &mut error_backoff),
                        }
                    }
                    error_backoff = (error_backoff * 2).min(Duration::from_secs(10));
                }
            }
            if Instant::now() >= next_cleanup {
                next_cleanup = Instant::now() + self.config.cleanup_interval;
                match self.cleanup().await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::debug!(deleted, "outbox retention cleanup"),
                    Err(error) => tracing::warn!(%error, "outbox retention cleanup failed"),
                }
            }
        }
        // Stopping: finish the batches in hand.
        while let Some(done) = in_flight.next().await {
            self.report(done, &mut error_backoff);
        }
        listener.abort();
        tracing::info!(relay = %self.id, "relay stopped");
    }

    /// Starts the relay on the tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let stop = CancellationToken::new();
        let stats = self.stats.clone();
        let (listening_tx, listening) = tokio::sync::watch::channel(false);
        let join = tokio::spawn(self.run_reporting(stop.clone(), listening_tx));
        RelayHandle { stop, join, stats, listening }
    }
}

fn snapshot(c: &Counters) -> RelayStats {
    RelayStats {
        published: c.published.load(Ordering::Relaxed),
        publish_failures: c.publish_failures.load(Ordering::Relaxed),
        gave_up: c.gave_up.load(Ordering::Relaxed),
        batches: c.batches.load(Ordering::Relaxed),
        batch_micros: c.batch_micros.load(Ordering::Relaxed),
        cleaned: c.cleaned.load(Ordering::Relaxed),
    }
}

/// Reads a relay's counters from anywhere (metrics); see [`RelayHandle::monitor`].
#[derive(Clone)]
pub struct RelayMonitor {
    stats: Arc<Counters>,
}

impl RelayMonitor {
    /// The relay's counters now.
    pub fn stats(&self) -> RelayStats {
        snapshot(&self.stats)
    }
}

impl std::fmt::Debug for RelayMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RelayMonitor").field(&self.stats()).finish()
    }
}

/// A running relay.
pub struct RelayHandle {
    stop: CancellationToken,
    join: JoinHandle<()>,
    stats: Arc<Counters>,
    listening: tokio::sync::watch::Receiver<bool>,
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
        snapshot(&self.stats)
    }

    /// A cloneable view of the relay's counters that outlives this handle (for metrics).
    pub fn monitor(&self) -> RelayMonitor {
        RelayMonitor { stats: self.stats.clone() }
    }

    /// Stops gracefully: the batch in hand is published and marked, then the relay returns.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.join.await {
            tracing::error!(%error, "relay task ended abnormally");
        }
    }

    /// Kills the relay where it stands, as a crash would: rows it claimed stay leased until the lease expires.
    /// For fault-injection tests.
    pub async fn kill(self) {
        self.join.abort();
        let _ = self.join.await;
    }
}

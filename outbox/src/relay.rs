//! The [`Relay`]: publishes committed outbox rows to an [`EventBus`] and marks them published only after the bus
//! confirmed them.
//!
//! # What it guarantees
//! - **No loss.** A row stays pending until the bus confirmed its event. A relay that dies between publishing and
//!   marking leaves its rows leased; another relay (or itself restarted) publishes them again. So an event may be
//!   published twice, never zero times: the consumers' inbox drops the duplicate.
//! - **Ownership by liveness.** A relay proves it is alive for as long as it runs (PostgreSQL: a session advisory
//!   lock on a connection of its own; SQLite: a heartbeat every 250 ms). Rows leased by a relay that is gone are
//!   free at once on PostgreSQL and after 2 s of silence on SQLite, so a killed service's events move on within
//!   about a second instead of waiting for the lease. The lease (renewed while the relay makes progress) stays as
//!   the last line of defence against a relay that is alive but stuck. Results are fenced by owner: a relay that
//!   lost its rows to another cannot mark or fail them.
//! - **Transport trouble costs nothing.** While [`EventBus::health`] fails, the relay claims nothing and resumes
//!   as soon as it passes. A publish stopped by the transport (no connection, timeout, closed channel, a nack while
//!   the bus is unhealthy) gives its row back with no attempt spent, and stops the rest of its batch. An outage of
//!   any length turns nothing into `failed`.
//! - **Attempts for the event's own faults.** A publish the bus refuses while healthy (unroutable, nacked) spends
//!   an attempt and backs off; after the configured attempts the row becomes `failed`. A permanent error (payload
//!   too large, invalid envelope) fails the row at once with its reason. Claiming counts the attempt, so a row on
//!   which relays keep crashing or hanging becomes `failed` too ("claimed N times without an outcome"). Failed
//!   rows are kept, counted, listed by [`Outbox::failed`] and re-queued by [`Outbox::retry_failed`].
//! - **Order per partition key, through failures.** A key's rows are published in outbox order, one at a time
//!   (the next only once the bus confirmed the previous one), and by one relay at a time. A row waits while any
//!   earlier row of its key is pending elsewhere, in backoff, or `failed`: a key whose head row failed stays
//!   *parked* ([`OutboxStatus::parked_keys`](crate::OutboxStatus::parked_keys)) until that row is retried.
//!   Other keys never wait for a blocked key. Limits: events with the same key enqueued by concurrent
//!   transactions are ordered by insertion, not commit (write the business row first); a relay that loses its
//!   liveness connection while publishing may see its rows taken over and a key's events cross between relays.
//! - **Several relays, no duplicates** in normal operation: claims use `FOR UPDATE SKIP LOCKED` and leases on
//!   PostgreSQL, a single `UPDATE … RETURNING` on SQLite.
//! - **Bounded.** At most two batches in flight, each of at most `relay.batch_size` rows and
//!   `relay.batch_bytes` of payload. Retention cleanup runs in its own task, a bounded amount per run.
//! - **Prompt.** It wakes when a producer in this process commits, on a PostgreSQL NOTIFY from other processes
//!   (its own process's NOTIFYs are ignored), and polls as a fallback; it keeps claiming while there is a backlog.

mod cleanup;
mod publish;
mod stats;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{BusError, EventBus};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::publish::{Ready, RowMeta, Settled};
use self::stats::Counters;
pub use self::stats::{RelayMonitor, RelayStats};
use crate::backend::{Backend, Owner, Ownership};
use crate::config::RelayConfig;
use crate::error::OutboxError;
use crate::outbox::Outbox;
use crate::row::OutboxRow;
use crate::sql::Dialect;

/// Batches in flight at once.
const PIPELINE: usize = 2;

/// How often a paused relay asks the bus whether it is healthy again.
const HEALTH_RECHECK: Duration = Duration::from_millis(100);

/// Backoff after a batch that transport trouble stopped (doubling up to the maximum; reset by a clean batch).
const TRANSPORT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Backoff after a failed claim (database trouble).
const CLAIM_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// Writing a batch's outcome is tried this many times (a database blip must not leave rows to the lease).
const WRITE_TRIES: u32 = 4;

/// Publishes an outbox's rows to a bus. Build it with [`Outbox::relay`], start it with [`spawn`](Self::spawn).
pub struct Relay<DB: Backend> {
    outbox: Outbox<DB>,
    bus: Arc<dyn EventBus>,
    config: RelayConfig,
    id: Uuid,
    wake: Arc<Notify>,
    stats: Arc<Counters>,
    /// The rows of each batch in flight and when it started, for lease renewal.
    leased: Mutex<HashMap<u64, (Vec<i64>, Instant)>>,
    next_batch: AtomicU64,
}

/// What a finished batch tells the engine.
struct BatchReport {
    /// The transport error that stopped it, if one did.
    transport: Option<BusError>,
}

/// What woke the engine.
enum Event {
    Stop,
    Claimed(Result<Vec<OutboxRow>, OutboxError>),
    BatchDone(BatchReport),
    Wake,
    Heartbeat,
    Renew,
    Timer,
}

/// Aborts a helper task when the relay's own task ends, however it ends (a killed relay leaves nothing behind).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn pending_or<T>(future: Option<&mut BoxFuture<'_, T>>) -> T {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Runs a claim in a task of its own, so that it always runs to its end even while the engine awaits something
/// else: a claim's statement that nobody reads would hold SQLite's write lock (and PostgreSQL's row locks).
fn spawn_claim<DB: Backend>(
    outbox: &Outbox<DB>,
    owner: Owner,
    config: &RelayConfig,
) -> BoxFuture<'static, Result<Vec<OutboxRow>, OutboxError>> {
    let (pool, sql) = (outbox.pool().clone(), outbox.sql_arc());
    let (batch, bytes, lease) = (config.batch_size, config.batch_bytes, config.lease);
    let task = AbortOnDrop(tokio::spawn(async move { DB::claim(&pool, &sql, &owner, batch, bytes, lease).await }));
    Box::pin(async move {
        let mut task = task;
        match (&mut task.0).await {
            Ok(claimed) => claimed,
            Err(_) => Err(OutboxError::Database(sqlx::Error::WorkerCrashed)),
        }
    })
}

impl<DB: Backend> Relay<DB> {
    pub(crate) fn new(outbox: Outbox<DB>, bus: Arc<dyn EventBus>, config: RelayConfig) -> Result<Self, OutboxError> {
        config.validate()?;
        #[cfg(feature = "failpoints")]
        let bus = crate::failpoint::refusing_bus(bus);
        let wake = outbox.register_relay();
        Ok(Self {
            outbox,
            bus,
            config,
            id: Uuid::new_v4(),
            wake,
            stats: Arc::default(),
            leased: Mutex::default(),
            next_batch: AtomicU64::new(0),
        })
    }

    /// This relay's id (the lease owner written in claimed rows).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The relay's counters.
    pub fn stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// Deletes published rows older than the retention window, in statements of `relay.cleanup_batch` rows, at
    /// most 20 statements per call (a running relay does this by itself every `relay.cleanup_interval`, in a
    /// task of its own). Returns how many rows it deleted.
    pub async fn cleanup(&self) -> Result<u64, OutboxError> {
        cleanup::run_once(&self.outbox, &self.config, &self.stats).await.map(|(deleted, _)| deleted)
    }

    /// Runs until `stop` is cancelled, then returns after finishing the batches in hand.
    pub async fn run(self, stop: CancellationToken) {
        self.run_reporting(stop, tokio::sync::watch::channel(false).0).await;
    }

    /// Starts the relay on the tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let stop = CancellationToken::new();
        let stats = self.stats.clone();
        let (listening_tx, listening) = tokio::sync::watch::channel(false);
        let join = tokio::spawn(self.run_reporting(stop.clone(), listening_tx));
        RelayHandle { stop, join, stats, listening }
    }

    fn lock_leased(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Vec<i64>, Instant)>> {
        self.leased.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How often the relay proves it is alive: PostgreSQL pings its lock connection (others see a dead one at
    /// once); SQLite writes a heartbeat that others read.
    fn heartbeat_every() -> Duration {
        match DB::dialect() {
            Dialect::Postgres => Duration::from_secs(1),
            Dialect::Sqlite => Duration::from_millis(250),
        }
    }

    async fn run_reporting(self, stop: CancellationToken, listening: tokio::sync::watch::Sender<bool>) {
        let tasks = stop.child_token();
        let _listener = {
            let (pool, sql, wake, stop) =
                (self.outbox.pool().clone(), self.outbox.sql_arc(), self.wake.clone(), tasks.clone());
            AbortOnDrop(tokio::spawn(async move { DB::listen(&pool, &sql, wake, listening, stop).await }))
        };
        let _cleanup = AbortOnDrop(tokio::spawn(cleanup::run(
            self.outbox.clone(),
            self.config.clone(),
            self.stats.clone(),
            tasks.clone(),
        )));
        tracing::info!(relay = %self.id, table = %self.outbox.sql().outbox, "relay started");

        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        let mut ownership: Option<Ownership> = None;
        let mut own_after = Instant::now();
        let mut batches: FuturesUnordered<BoxFuture<'_, BatchReport>> = FuturesUnordered::new();
        let mut claiming: Option<BoxFuture<'_, Result<Vec<OutboxRow>, OutboxError>>> = None;
        let mut want_claim = true;
        let mut not_before = Instant::now();
        let mut claim_backoff = CLAIM_BACKOFF.0;
        let mut transport_backoff = TRANSPORT_BACKOFF.0;
        let mut paused = false;
        let mut stopping = false;
        let mut heartbeat = tokio::time::interval(Self::heartbeat_every());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let renew_every = self.config.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if stopping && claiming.is_none() && batches.is_empty() {
                break;
            }
            if ownership.is_none() && !stopping && Instant::now() >= own_after {
                match DB::hold_ownership(pool, sql, self.id).await {
                    Ok(held) => {
                        tracing::debug!(relay = %self.id, owner = ?held.owner, "relay holds its liveness proof");
                        ownership = Some(held);
                        // Rows in flight from before a lost proof now point at the new one.
                        self.renew_leases(ownership.as_ref().map(|o| o.owner)).await;
                    }
                    Err(error) => {
                        tracing::warn!(relay = %self.id, %error, "relay cannot prove it is alive; not claiming");
                        own_after = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
            let owner = ownership.as_ref().map(|o| o.owner);
            if let Some(owner) = owner
                && !stopping
                && want_claim
                && claiming.is_none()
                && batches.len() < PIPELINE
                && Instant::now() >= not_before
            {
                match self.bus.health().await {
                    Ok(()) => {
                        if paused {
                            tracing::info!(relay = %self.id, "bus healthy again: relay resumes");
                            paused = false;
                        }
                        claiming = Some(spawn_claim(&self.outbox, owner, &self.config));
                    }
                    Err(error) => {
                        if !paused {
                            tracing::warn!(relay = %self.id, %error, "bus unhealthy: relay pauses (no attempt is spent) until it is back");
                            paused = true;
                        }
                        not_before = Instant::now() + HEALTH_RECHECK;
                    }
                }
            }
            let timer_armed = want_claim && !stopping && Instant::now() < not_before;
            let event = tokio::select! {
                () = stop.cancelled(), if !stopping => Event::Stop,
                claimed = pending_or(claiming.as_mut()), if claiming.is_some() => Event::Claimed(claimed),
                Some(report) = batches.next(), if !batches.is_empty() => Event::BatchDone(report),
                () = self.wake.notified(), if !stopping => Event::Wake,
                _ = poll.tick(), if !stopping => Event::Wake,
                _ = heartbeat.tick() => Event::Heartbeat,
                _ = renew.tick() => Event::Renew,
                () = tokio::time::sleep_until(not_before.into()), if timer_armed => Event::Timer,
            };
            match event {
                Event::Stop => stopping = true,
                Event::Claimed(claimed) => {
                    claiming = None;
                    match claimed {
                        Ok(rows) if rows.is_empty() => want_claim = false,
                        Ok(rows) => {
                            claim_backoff = CLAIM_BACKOFF.0;
                            if let Some(owner) = owner {
                                batches.push(Box::pin(self.run_batch(owner, rows)));
                            }
                        }
                        Err(error) => {
                            tracing::warn!(relay = %self.id, %error, backoff = ?claim_backoff, "relay claim failed; retrying");
                            not_before = Instant::now() + claim_backoff;
                            claim_backoff = (claim_backoff * 2).min(CLAIM_BACKOFF.1);
                        }
                    }
                }
                Event::BatchDone(report) => {
                    want_claim = true;
                    match report.transport {
                        Some(error) => {
                            tracing::warn!(relay = %self.id, %error, backoff = ?transport_backoff, "publishing stopped by transport trouble; rows given back with no attempt spent");
                            not_before = not_before.max(Instant::now() + transport_backoff);
                            transport_backoff = (transport_backoff * 2).min(TRANSPORT_BACKOFF.1);
                        }
                        None => transport_backoff = TRANSPORT_BACKOFF.0,
                    }
                }
                Event::Wake | Event::Timer => want_claim = true,
                Event::Heartbeat => {
                    if let Some(held) = ownership.as_mut()
                        && let Err(error) = DB::keep_ownership(pool, sql, held).await
                    {
                        tracing::warn!(relay = %self.id, %error, "relay lost its liveness proof: others may take its rows over; it claims nothing until it holds a new one");
                        if let Some(lost) = ownership.take() {
                            DB::drop_ownership(pool, sql, lost).await;
                        }
                    }
                }
                Event::Renew => self.renew_leases(owner).await,
            }
        }
        drop(batches);
        if let Some(held) = ownership.take() {
            DB::drop_ownership(pool, sql, held).await;
        }
        tasks.cancel();
        tracing::info!(relay = %self.id, "relay stopped");
    }

    /// Renews the lease of the rows of every batch in flight that is still making progress; a batch older than
    /// `confirm_timeout + lease` is stuck, and its rows are left to expire so that another relay takes them.
    async fn renew_leases(&self, owner: Option<Owner>) {
        let Some(owner) = owner else { return };
        let stuck_after = self.config.confirm_timeout * 2 + self.config.lease;
        let seqs: Vec<i64> = {
            let leased = self.lock_leased();
            for (seqs, started) in leased.values().filter(|(_, started)| started.elapsed() >= stuck_after) {
                tracing::error!(relay = %self.id, rows = seqs.len(), age = ?started.elapsed(), "relay batch is stuck; its lease is left to expire so that another relay takes it over");
            }
            leased
                .values()
                .filter(|(_, started)| started.elapsed() < stuck_after)
                .flat_map(|(s, _)| s.iter().copied())
                .collect()
        };
        if seqs.is_empty() {
            return;
        }
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        match DB::renew_lease(pool, sql, &owner, &seqs, self.config.lease).await {
            Ok(held) if held < seqs.len() as u64 => tracing::debug!(
                relay = %self.id, held, leased = seqs.len(),
                "lease renewed on part of the rows in flight (the others were just marked, or taken over)"
            ),
            Ok(_) => {}
            Err(error) => tracing::warn!(relay = %self.id, %error, "lease renewal failed"),
        }
    }

    /// One batch: prepares the claimed rows, publishes them, writes every outcome back (fenced by owner).
    async fn run_batch(&self, owner: Owner, rows: Vec<OutboxRow>) -> BatchReport {
        let started = Instant::now();
        let claimed = rows.len();
        let batch = self.next_batch.fetch_add(1, Ordering::Relaxed);
        self.lock_leased().insert(batch, (rows.iter().map(|r| r.seq).collect(), started));

        let mut settled = Settled::default();
        let mut ready = Vec::with_capacity(rows.len());
        // Keys whose earlier row of this batch failed here: their later rows wait (given back untried).
        let mut held_back = std::collections::HashSet::new();
        for row in rows {
            let key = row.partition_key.clone();
            if key.as_ref().is_some_and(|k| held_back.contains(k)) {
                settled.released.push(row.seq);
                continue;
            }
            let attempts = u32::try_from(row.attempts).unwrap_or(0);
            let meta = RowMeta { seq: row.seq, event_id: row.event_id, attempts, key: key.clone() };
            // Claimed once more than the attempts allow: the earlier claims ended without an outcome.
            let crashed = !self.config.retry.should_retry(attempts.saturating_sub(1));
            let prepared = if crashed {
                Err(format!(
                    "claimed {attempts} times without an outcome: relays crashed or hung on this event (last \
                     attempt allowed: {})",
                    self.config.retry.max_attempts
                ))
            } else {
                row.into_envelope().map_err(|e| e.to_string())
            };
            match prepared {
                Ok(envelope) => ready.push(Ready { meta, envelope }),
                Err(reason) => {
                    tracing::error!(seq = meta.seq, event_id = %meta.event_id, %reason, "outbox row cannot be published; marked failed");
                    self.fail_row(&owner, &meta, &reason, true).await;
                    if let Some(key) = key {
                        held_back.insert(key);
                    }
                }
            }
        }
        let sending = ready.len();
        let published = publish::publish(self.bus.as_ref(), ready, self.config.confirm_timeout).await;
        settled.published = published.published;
        settled.failed = published.failed;
        settled.released.extend(published.released);
        settled.transport = published.transport;
        let publish_ms = started.elapsed().as_secs_f64() * 1e3;

        self.write_back(&owner, &settled).await;
        self.lock_leased().remove(&batch);
        tracing::debug!(
            relay = %self.id,
            rows = claimed,
            sent = sending,
            published = settled.published.len(),
            failed = settled.failed.len(),
            released = settled.released.len(),
            publish_and_confirm_ms = publish_ms,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "batch done"
        );
        Counters::add(&self.stats.batches, 1);
        Counters::add(&self.stats.batch_micros, u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        BatchReport { transport: settled.transport }
    }

    /// Writes a batch's outcome: marks, failures, releases; each fenced by owner, each tried a few times.
    async fn write_back(&self, owner: &Owner, settled: &Settled) {
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        if !settled.published.is_empty() {
            #[cfg(feature = "failpoints")]
            crate::failpoint::crash_point("relay-after-confirm");
            let seqs = &settled.published;
            if let Some(marked) = retrying("mark published", || DB::mark_published(pool, sql, owner, seqs)).await {
                Counters::add(&self.stats.published, marked);
                if marked < seqs.len() as u64 {
                    tracing::warn!(
                        relay = %self.id, marked, confirmed = seqs.len(),
                        "some confirmed events were no longer this relay's (taken over after a lost lease or \
                         liveness proof): the other relay publishes them again; consumers' inboxes drop the duplicates"
                    );
                }
            }
        }
        for (meta, error, permanent) in &settled.failed {
            Counters::add(&self.stats.publish_failures, 1);
            let give_up = *permanent || !self.config.retry.should_retry(meta.attempts);
            if give_up {
                tracing::error!(seq = meta.seq, event_id = %meta.event_id, attempts = meta.attempts, permanent, %error, "publish failed for the last time; event marked failed");
                self.fail_row(owner, meta, &error.to_string(), true).await;
            } else {
                let retry_in = self.config.retry.delay(meta.attempts + 1);
                tracing::warn!(seq = meta.seq, event_id = %meta.event_id, attempts = meta.attempts, ?retry_in, %error, "publish failed; will retry");
                let reason = error.to_string();
                retrying("record failure", || DB::record_failure(pool, sql, owner, meta.seq, &reason, false, retry_in))
                    .await;
            }
        }
        if !settled.released.is_empty() {
            if settled.transport.is_some() {
                Counters::add(&self.stats.transport_failures, settled.released.len() as u64);
            }
            let seqs = &settled.released;
            retrying("release", || DB::release(pool, sql, owner, seqs)).await;
        }
    }

    async fn fail_row(&self, owner: &Owner, meta: &RowMeta, reason: &str, give_up: bool) {
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        if let Some(true) = retrying("record failure", || {
            DB::record_failure(pool, sql, owner, meta.seq, reason, give_up, Duration::ZERO)
        })
        .await
        {
            Counters::add(&self.stats.gave_up, 1);
        }
    }
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
    /// connection is dropped; SQLite: the heartbeat stops), so other relays take its rows over. For
    /// fault-injection tests.
    pub async fn kill(self) {
        self.join.abort();
        let _ = self.join.await;
    }
}

//! The [`Relay`]: publishes committed outbox rows to an [`EventBus`] and marks them published only after the bus
//! confirmed them.
//!
//! # What it guarantees
//! - **No loss.** A row stays pending until the bus confirmed its event. A relay that dies between publishing and
//!   marking leaves its rows leased; another relay (or itself restarted) publishes them again. So an event may be
//!   published twice, never zero times: the consumers' inbox drops the duplicate.
//! - **Ownership by liveness.** A relay proves it is alive for as long as it runs (PostgreSQL: a session advisory
//!   lock on a connection of its own; SQLite: a lock on a file of its own beside the database, which nothing has to
//!   renew on time, so a relay whose writes wait behind others' locks is never taken for dead). Rows leased by a
//!   relay that is gone are free at once on PostgreSQL and within 250 ms on SQLite, so a killed service's events move on within
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
//!   transactions have no order between them unless the transactions serialize (write the business row
//!   first: a READ COMMITTED transaction that waited for another's row lock sees its committed events and
//!   publishes after them); a relay that loses its liveness connection while publishing may see its rows taken
//!   over and a key's events cross between relays.
//! - **Several relays, no duplicates** in normal operation: claims use `FOR UPDATE SKIP LOCKED` and leases on
//!   PostgreSQL, a single `UPDATE … RETURNING` on SQLite.
//! - **Bounded.** It holds at most two batches' worth of rows (`relay.batch_size`) and payload
//!   (`relay.batch_bytes`), whether claimed or handed over. Retention cleanup runs in its own task, a bounded
//!   amount per run.
//! - **Prompt.** On PostgreSQL a transaction of [`Outbox::begin`](crate::Outbox::begin) (or the inbox's) hands
//!   its rows to the relay of its process right after the commit, with no claim (direct dispatch, see
//!   [`RelayConfig::direct_dispatch`](crate::RelayConfig::direct_dispatch): only a key's head row goes direct;
//!   the others take the claim, in order). Otherwise it wakes when a producer in this process commits, on a
//!   PostgreSQL NOTIFY from other processes (its own process's NOTIFYs are ignored), and polls as a fallback;
//!   it keeps claiming while there is a backlog. Its own writes (claims, marks, renewals, releases) commit
//!   without waiting for the WAL flush: one lost in a database crash republishes, never loses.

mod claim;
mod cleanup;
mod handle;
mod liveness;
mod pipeline;
mod stats;
mod write_back;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{BusError, Confirmation, EventBus};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use self::claim::{ClaimFuture, spawn_claim};
pub use self::handle::RelayHandle;
use self::pipeline::{Pipeline, Ready, RowMeta, Source, Verdict};
use self::stats::Counters;
pub use self::stats::{RelayMonitor, RelayStats};
use self::write_back::Written;
use crate::backend::{Backend, Owner};
use crate::config::RelayConfig;
use crate::direct::{DirectTarget, Handoff};
use crate::error::OutboxError;
use crate::outbox::Outbox;
use crate::row::OutboxRow;
use crate::sql::Dialect;

/// A relay holds at most this many claims' worth of rows (and bytes) at once.
const PIPELINE: usize = 2;

/// How often a paused relay asks the bus whether it is healthy again.
const HEALTH_RECHECK: Duration = Duration::from_millis(100);

/// Backoff after a batch that transport trouble stopped (doubling up to the maximum; reset by a clean batch).
const TRANSPORT_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// Backoff after a failed claim (database trouble).
const CLAIM_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(10));

/// Publishes an outbox's rows to a bus. Build it with [`Outbox::relay`], start it with [`spawn`](Self::spawn).
pub struct Relay<DB: Backend> {
    outbox: Outbox<DB>,
    bus: Arc<dyn EventBus>,
    config: RelayConfig,
    id: Uuid,
    wake: Arc<Notify>,
    stats: Arc<Counters>,
    /// Direct dispatch (PostgreSQL): the offer producers of this process lease their rows to, and its hand-offs.
    direct: Option<(Arc<DirectTarget>, tokio::sync::mpsc::Receiver<Handoff>)>,
}

/// What woke the engine.
enum Event {
    Stop,
    Claimed(Result<Vec<OutboxRow>, OutboxError>),
    HandedOff(Handoff),
    Confirmed(RowMeta, Verdict),
    Written(Written),
    Wake,
    OwnerChanged,
    Renew,
    Timer,
}

/// The next hand-off, if the relay takes them.
async fn next_handoff(handoffs: Option<&mut tokio::sync::mpsc::Receiver<Handoff>>) -> Option<Handoff> {
    match handoffs {
        Some(handoffs) => handoffs.recv().await,
        None => std::future::pending().await,
    }
}

/// Withdraws a relay's direct-dispatch offer when it ends, however it ends.
struct Withdraw<'a, DB: Backend> {
    outbox: &'a Outbox<DB>,
    relay: Uuid,
    target: Option<&'a Arc<DirectTarget>>,
}

impl<DB: Backend> Drop for Withdraw<'_, DB> {
    fn drop(&mut self) {
        if let Some(target) = self.target {
            target.accept_as(None);
            self.outbox.direct().withdraw(self.relay);
        }
    }
}

async fn pending_or<T>(future: Option<&mut BoxFuture<'_, T>>) -> T {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Aborts a helper task when the relay's own task ends, however it ends (a killed relay leaves nothing behind).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<DB: Backend> Outbox<DB> {
    /// A relay that publishes this outbox's events to `bus`. Start it with [`Relay::spawn`].
    ///
    /// # Errors
    /// [`OutboxError::InvalidConfig`] naming the invalid relay setting.
    pub fn relay(&self, bus: Arc<dyn EventBus>, config: RelayConfig) -> Result<Relay<DB>, OutboxError> {
        Relay::new(self.clone(), bus, config)
    }
}

impl<DB: Backend> Relay<DB> {
    pub(crate) fn new(outbox: Outbox<DB>, bus: Arc<dyn EventBus>, config: RelayConfig) -> Result<Self, OutboxError> {
        config.validate()?;
        #[cfg(feature = "failpoints")]
        let bus = crate::failpoint::refusing_bus(bus);
        let wake = outbox.register_relay();
        let id = Uuid::new_v4();
        let direct = (DB::dialect() == Dialect::Postgres && config.direct_dispatch)
            .then(|| DirectTarget::new(id, config.lease, config.batch_size));
        Ok(Self { outbox, bus, config, id, wake, stats: Arc::default(), direct })
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

    async fn run_reporting(mut self, stop: CancellationToken, listening: tokio::sync::watch::Sender<bool>) {
        let tasks = stop.child_token();
        let (direct, mut handoffs) = match self.direct.take() {
            Some((target, handoffs)) => (Some(target), Some(handoffs)),
            None => (None, None),
        };
        // However the relay ends, producers stop leasing rows to it.
        let _withdraw = Withdraw { outbox: &self.outbox, relay: self.id, target: direct.as_ref() };
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

        let retry = self.config.retry.clone();
        let max_rows = self.config.batch_size * PIPELINE;
        let max_bytes = self.config.batch_bytes.saturating_mul(PIPELINE);
        let mut pipeline = Pipeline::default();
        let mut confirms: FuturesUnordered<BoxFuture<'static, (RowMeta, Verdict)>> = FuturesUnordered::new();
        let living = CancellationToken::new();
        let (liveness, mut owner_rx, proof) = liveness::spawn(self.outbox.clone(), self.id, living.clone());
        let mut liveness = AbortOnDrop(liveness);
        // Writes are fenced by the relay's id, which survives a lost liveness proof.
        let mut last_owner: Option<Owner> = None;
        let mut woken_while_claiming = false;
        let mut writing_gives = false;
        let mut claim_not_before = Instant::now();
        // The claim running, with the write-backs it could see when it started and the owner it claimed as.
        let mut claiming: Option<(u64, Owner, ClaimFuture)> = None;
        let mut writing: Option<BoxFuture<'static, Written>> = None;
        let mut want_claim = true;
        let mut not_before = Instant::now();
        let mut claim_backoff = CLAIM_BACKOFF.0;
        let mut transport_backoff = TRANSPORT_BACKOFF.0;
        let mut paused = false;
        let mut stopping = false;
        let mut direct_offered: Option<Owner> = None;
        let renew_every = self.config.lease / 3;
        let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            // Acting (claiming, sending) needs a fresh proof of liveness; writing back only needs the relay's id.
            let owner = (*owner_rx.borrow()).filter(|_| proof.fresh());
            let healthy_now = Instant::now() >= not_before && owner.is_some();
            // Stopping: what is held unsent goes back now, in the write-back just below (written later, the loop
            // slept with it until the next renewal: nothing else wakes a stopping relay).
            if stopping {
                pipeline.give_back_unsent(false);
            }
            // Write back first: a long send round must not hold marks and releases up.
            if writing.is_none()
                && pipeline.has_outcomes()
                && let Some(owner) = last_owner
            {
                let (id, outcomes) = pipeline.take_outcomes();
                writing_gives = outcomes.gives_back();
                writing = Some(self.spawn_write(owner, id, outcomes));
            }
            if !stopping && healthy_now {
                let ready = pipeline.sendable();
                if !ready.is_empty() {
                    self.send(ready, &mut confirms).await;
                }
            }
            if let Some(target) = &direct {
                // Producers lease their rows to this relay only while it can publish them at once.
                let accepting = owner.filter(|_| {
                    !stopping
                        && !paused
                        && healthy_now
                        && pipeline.held_rows() < max_rows
                        && pipeline.held_bytes() < max_bytes
                });
                if accepting != direct_offered {
                    target.accept_as(accepting);
                    if accepting.is_some() {
                        self.outbox.direct().offer(target);
                    }
                    direct_offered = accepting;
                }
            }
            if stopping && claiming.is_none() && writing.is_none() && confirms.is_empty() && !pipeline.has_outcomes() {
                break;
            }
            if let Some(owner) = owner
                && !stopping
                && want_claim
                && claiming.is_none()
                && healthy_now
                && Instant::now() >= claim_not_before
                // Rows being given back must be free (or blocking, for failures) before the next claim runs: a
                // claim that still saw them as this relay's could take their keys' later rows past them.
                && !pipeline.gives_back()
                && !writing_gives
                && pipeline.held_rows() < max_rows
                && pipeline.held_bytes() < max_bytes
            {
                match self.bus.health().await {
                    Ok(()) => {
                        if paused {
                            tracing::info!(relay = %self.id, "bus healthy again: relay resumes");
                            paused = false;
                        }
                        let rows = self.config.batch_size.min(max_rows - pipeline.held_rows());
                        let bytes = self.config.batch_bytes.min(max_bytes - pipeline.held_bytes());
                        let saw = pipeline.writes_done();
                        let held = pipeline.held_seqs();
                        woken_while_claiming = false;
                        claiming =
                            Some((saw, owner, spawn_claim(&self.outbox, owner, held, rows, bytes, self.config.lease)));
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
            // Wake at the next moment sending or claiming may resume.
            let now = Instant::now();
            let wait_until = [not_before, claim_not_before].into_iter().filter(|t| *t > now).min();
            let timer_armed = !stopping && wait_until.is_some();
            let wait_until = wait_until.unwrap_or(now);
            let event = tokio::select! {
                () = stop.cancelled(), if !stopping => Event::Stop,
                claimed = pending_or(claiming.as_mut().map(|(_, _, f)| f)), if claiming.is_some() => Event::Claimed(claimed),
                Some(handoff) = next_handoff(handoffs.as_mut()), if handoffs.is_some() => Event::HandedOff(handoff),
                Ok(()) = owner_rx.changed() => Event::OwnerChanged,
                Some((meta, verdict)) = confirms.next(), if !confirms.is_empty() => Event::Confirmed(meta, verdict),
                written = pending_or(writing.as_mut()), if writing.is_some() => Event::Written(written),
                () = self.wake.notified(), if !stopping => Event::Wake,
                _ = poll.tick(), if !stopping => Event::Wake,
                _ = renew.tick() => Event::Renew,
                () = tokio::time::sleep_until(wait_until.into()), if timer_armed => Event::Timer,
            };
            match event {
                Event::Stop => stopping = true,
                Event::Claimed(claimed) => {
                    let Some((saw, claimed_as, _)) = claiming.take() else { continue };
                    match claimed {
                        // Nothing claimable; unless a commit woke the relay while it claimed, wait for the next.
                        Ok(rows) if rows.is_empty() => want_claim = woken_while_claiming,
                        Ok(rows) => {
                            claim_backoff = CLAIM_BACKOFF.0;
                            pipeline.accept(rows, saw, &retry, Source::Claim);
                            let current = *owner_rx.borrow();
                            if let Some(current) = current
                                && current != claimed_as
                            {
                                // The proof changed while claiming: point the new rows at the current one now.
                                self.renew_leases(&current, &mut pipeline).await;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(relay = %self.id, %error, backoff = ?claim_backoff, "relay claim failed; retrying");
                            claim_not_before = Instant::now() + claim_backoff;
                            claim_backoff = (claim_backoff * 2).min(CLAIM_BACKOFF.1);
                        }
                    }
                }
                Event::HandedOff(Handoff { owner: leased_to, rows }) => {
                    // Taken in only while the relay can hold them (its bounds, a healthy bus, the same proof).
                    let room = pipeline.held_rows() < max_rows && pipeline.held_bytes() < max_bytes;
                    if !stopping && !paused && room && owner == Some(leased_to) {
                        let taken = pipeline.accept(rows, pipeline.writes_done(), &retry, Source::Handoff);
                        Counters::add(&self.stats.handed_off, taken as u64);
                    } else {
                        // Leased to this relay but not taken in: given back with no attempt spent (fenced by the
                        // relay's id, so whatever it lost to another relay meanwhile is left alone); then any
                        // relay's claim takes them.
                        pipeline.give_back_unheld(rows.iter().map(|r| r.seq));
                        want_claim = true;
                    }
                }
                Event::Confirmed(meta, verdict) => {
                    if !matches!(verdict, Verdict::Published | Verdict::Transport { .. }) {
                        Counters::add(&self.stats.publish_failures, 1);
                    }
                    if let Some(error) = pipeline.settle(meta, verdict, &retry) {
                        // The bus is in trouble (it says so itself): fail fast.
                        // Fail fast: nothing more goes out; what was not sent goes back with no attempt spent.
                        pipeline.give_back_unsent(true);
                        if Instant::now() >= not_before {
                            tracing::warn!(relay = %self.id, %error, backoff = ?transport_backoff, "publishing stopped by transport trouble; rows given back with no attempt spent");
                            not_before = Instant::now() + transport_backoff;
                            transport_backoff = (transport_backoff * 2).min(TRANSPORT_BACKOFF.1);
                        }
                    } else {
                        transport_backoff = TRANSPORT_BACKOFF.0;
                    }
                    // No claim for a confirm by itself: a claim still wanted (a backlog, or one held up by the
                    // pipeline's bounds) is still wanted; rows given back ask for one once written.
                }
                Event::Written(written) => {
                    writing = None;
                    writing_gives = false;
                    let finished = pipeline.written(written.id, &written.outcomes);
                    if written.ok {
                        pipeline.marked(&written.outcomes.published, written.id);
                        Counters::add(&self.stats.published, written.marked);
                        Counters::add(&self.stats.gave_up, written.gave_up);
                        Counters::add(&self.stats.transport_failures, written.outcomes.transport_released);
                    }
                    Counters::add(&self.stats.batches, finished.claims);
                    Counters::add(&self.stats.batch_micros, finished.claim_micros);
                    // Rows given back are claimable again (a claim still wanted stays wanted).
                    want_claim |= written.outcomes.gives_back() || !written.ok;
                }
                Event::Wake => {
                    want_claim = true;
                    woken_while_claiming = claiming.is_some();
                }
                Event::Timer => want_claim = true,
                Event::OwnerChanged => {
                    let current = *owner_rx.borrow_and_update();
                    if let Some(current) = current {
                        last_owner = Some(current);
                        // Rows held from before a lost proof now point at the new one.
                        self.renew_leases(&current, &mut pipeline).await;
                    }
                }
                Event::Renew => {
                    if let Some(owner) = owner {
                        self.renew_leases(&owner, &mut pipeline).await;
                    }
                }
            }
        }
        // Everything is written back: give the proof up (the rows left, if any, are free at once).
        living.cancel();
        let _ = (&mut liveness.0).await;
        tasks.cancel();
        tracing::info!(relay = %self.id, "relay stopped");
    }

    /// Hands `ready` to the bus, one after the other, for at most a third of the lease (so that renewals and
    /// write-backs are never held up longer); each confirmation (at most `confirm_timeout`) becomes a verdict in
    /// `confirms`. The first publish the bus refuses stops the round: it and the rest are transport trouble
    /// (given back, no attempt spent).
    async fn send(&self, ready: Vec<Ready>, confirms: &mut FuturesUnordered<BoxFuture<'static, (RowMeta, Verdict)>>) {
        let timeout = self.config.confirm_timeout;
        let budget = (self.config.lease / 3).min(timeout);
        let deadline = tokio::time::Instant::now() + budget;
        let mut stopped: Option<BusError> = None;
        for Ready { meta, envelope } in ready {
            if let Some(error) = &stopped {
                let error = BusError::ConfirmationLost(format!("not sent: an earlier publish failed ({error})"));
                confirms.push(Box::pin(async move { (meta, Verdict::Transport { error, healthy: false }) }));
                continue;
            }
            let span = bus_core::transport::send_span(&envelope);
            let publish = self.bus.publish(envelope).instrument(span.clone());
            let confirmation = match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(confirmation)) => confirmation,
                Ok(Err(error)) => {
                    stopped = Some(BusError::ConfirmationLost(error.to_string()));
                    Confirmation::failed(error)
                }
                Err(_) => {
                    let error = BusError::ConfirmationLost(format!("publishing took longer than {budget:?}"));
                    bus_core::transport::send_outcome(&span, Some(&error));
                    stopped = Some(BusError::ConfirmationLost(error.to_string()));
                    confirms.push(Box::pin(async move { (meta, Verdict::Transport { error, healthy: false }) }));
                    continue;
                }
            };
            let bus = self.bus.clone();
            confirms.push(Box::pin(async move {
                let result =
                    tokio::time::timeout(timeout, confirmation).instrument(span.clone()).await.unwrap_or_else(|_| {
                        Err(BusError::ConfirmationLost(format!(
                            "no confirmation within relay.confirm_timeout ({timeout:?})"
                        )))
                    });
                // The send span ends with the confirmation (or its absence), before the verdict is made.
                bus_core::transport::send_outcome(&span, result.as_ref().err());
                drop(span);
                (meta, pipeline::verdict(bus.as_ref(), result).await)
            }));
        }
    }

    /// Renews the lease of every row the relay holds (and points them at its current liveness key). The engine
    /// does this between its other steps, so a relay that stopped making progress stops renewing.
    ///
    /// Rows not yet sent that are no longer this relay's (another relay took them after a lost lease or proof)
    /// are dropped unsent, and the rest of their keys goes back: the other relay publishes them.
    async fn renew_leases(&self, owner: &Owner, pipeline: &mut Pipeline) {
        let seqs = pipeline.held_seqs();
        if seqs.is_empty() {
            return;
        }
        let (pool, sql) = (self.outbox.pool(), self.outbox.sql());
        match DB::renew_lease(pool, sql, owner, &seqs, self.config.lease).await {
            Ok(held) => {
                let held: std::collections::HashSet<i64> = held.into_iter().collect();
                let lost = pipeline.drop_lost_unsent(&held);
                if lost > 0 {
                    tracing::warn!(relay = %self.id, lost, "rows this relay had not sent yet were taken over by another relay (lost lease or liveness proof): dropped here, the other relay publishes them");
                }
            }
            Err(error) => tracing::warn!(relay = %self.id, %error, "lease renewal failed"),
        }
    }
}

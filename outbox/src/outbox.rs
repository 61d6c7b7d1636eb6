//! [`Outbox`]: enqueue events in the caller's transaction; inspect and repair what the relay left.

use std::fmt;
use std::sync::Arc;

use bus_core::{Envelope, EnvelopeBuilder, EventTypeName, GroupName, IntegrationEvent};
use chrono::{DateTime, Utc};
use sqlx::{Pool, Transaction};
use uuid::Uuid;

use crate::backend::{Backend, CommitWake, WakeAtCommit};
use crate::commit_watch::CommitWatch;
use crate::config::OutboxConfig;
use crate::direct::{DirectSlot, Dispatch};
use crate::error::OutboxError;
use crate::row::{FailedEvent, OutboxRow, OutboxStatus};
use crate::sql::{Dialect, Sql};
use crate::wakeup::Wakeup;

/// The transactional outbox of one service on one database. Cheap to clone.
///
/// Events are written in a transaction, so they commit or roll back with the business change: a rolled-back
/// transaction never publishes anything. [`begin`](Self::begin) gives an [`OutboxTransaction`] that enqueues
/// and wakes the relay when it commits; [`enqueue`](Self::enqueue) writes through a connection or transaction
/// of the caller's own and makes its commit wake the relays too (PostgreSQL: the insert returns its transaction
/// id, watched until that commits, within a millisecond or two, with no `NOTIFY` inside the caller's
/// transaction; SQLite: a commit hook on the connection).
pub struct Outbox<DB: Backend> {
    inner: Arc<Inner<DB>>,
}

struct Inner<DB: Backend> {
    pool: Pool<DB>,
    config: OutboxConfig,
    sql: Arc<Sql>,
    wakeup: Arc<Wakeup>,
    commits: Arc<CommitWatch>,
    /// The relay of this process that takes committed rows directly (PostgreSQL).
    direct: DirectSlot,
}

impl<DB: Backend> Drop for Inner<DB> {
    fn drop(&mut self) {
        self.commits.stop();
    }
}

impl<DB: Backend> Clone for Outbox<DB> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<DB: Backend> fmt::Debug for Outbox<DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox").field("config", &self.inner.config).field("table", &self.inner.sql.outbox).finish()
    }
}

impl<DB: Backend> Outbox<DB> {
    /// An outbox on `pool`. Call [`migrate`](Self::migrate) once at start-up before using it.
    ///
    /// # Errors
    /// [`OutboxError::InvalidConfig`] naming the setting (bad schema or prefix, a schema on SQLite, ...).
    pub fn new(pool: Pool<DB>, config: OutboxConfig) -> Result<Self, OutboxError> {
        config.validate()?;
        let dialect = DB::dialect();
        if dialect == Dialect::Sqlite && config.schema.is_some() {
            return Err(OutboxError::config("outbox.schema", "SQLite has no schemas; use table_prefix"));
        }
        let sql = Arc::new(Sql::new(&config, dialect));
        let wakeup = Arc::new(Wakeup::new(
            config.notify_other_processes && dialect == Dialect::Postgres,
            config.notify_interval,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                sql,
                wakeup,
                commits: CommitWatch::new(),
                direct: DirectSlot::default(),
            }),
        })
    }

    /// Creates or upgrades our tables (outbox, inbox) in their own migrations table, so they never clash with
    /// the application's migrator. Safe to run from several instances at once.
    pub async fn migrate(&self) -> Result<(), OutboxError> {
        DB::migrate(&self.inner.pool, &self.inner.sql).await
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.inner.pool
    }

    /// The settings.
    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }

    pub(crate) fn sql_arc(&self) -> Arc<Sql> {
        self.inner.sql.clone()
    }

    /// Writes `event` to the outbox through `conn` (pass `&mut *tx` for a transaction of your own); its commit
    /// wakes the relays. Outside a transaction the event commits by itself (an error before the commit means
    /// nothing was written; a lost reply to it leaves that unknown: to retry safely, give the event an id of
    /// your own with [`enqueue_with`](Self::enqueue_with) and [`EnvelopeBuilder::id`], and consumers' inboxes
    /// drop the duplicate). Returns the event id.
    ///
    /// # Errors
    /// [`bus_core::BusError::PayloadTooLarge`] (naming the type and size) or another envelope error, before
    /// anything is written; a database error.
    pub async fn enqueue<E: IntegrationEvent>(
        &self,
        conn: &mut DB::Connection,
        event: &E,
    ) -> Result<Uuid, OutboxError> {
        self.enqueue_with(conn, Envelope::for_event(event)?).await
    }

    /// Writes an event built by `builder` (to set the correlation id, causation, trace context, ...) through
    /// `conn`; its commit wakes the relays. The source and the payload limit come from the outbox's settings.
    pub async fn enqueue_with(&self, conn: &mut DB::Connection, builder: EnvelopeBuilder) -> Result<Uuid, OutboxError> {
        self.enqueue_scheduled(conn, builder, None).await
    }

    /// Writes an event to be published once `not_before` has come (by the database clock), with the same
    /// guarantees as any other. A relay publishes it at its first claim after that time (within its
    /// `poll_interval`, 1 s by default). Per-key order holds: a scheduled keyed event holds back the later
    /// events of its key until it is published, so schedule keyless events, or give scheduled ones a key of
    /// their own, unless that is what you want.
    pub async fn enqueue_scheduled(
        &self,
        conn: &mut DB::Connection,
        builder: EnvelopeBuilder,
        not_before: Option<DateTime<Utc>>,
    ) -> Result<Uuid, OutboxError> {
        self.insert(conn, builder, not_before, Some(&self.wake_local())).await
    }

    /// Writes one event through `conn`, to be published from `not_before` on, with `wake` for the commit.
    async fn insert(
        &self,
        conn: &mut DB::Connection,
        builder: EnvelopeBuilder,
        not_before: Option<DateTime<Utc>>,
        wake: Option<&WakeAtCommit>,
    ) -> Result<Uuid, OutboxError> {
        let envelope = self.envelope(builder)?;
        DB::insert_outbox(conn, &self.inner.sql, std::slice::from_ref(&envelope), not_before, wake).await?;
        Ok(envelope.id())
    }

    /// Writes ready-made envelopes, in order, through `conn`; its commit wakes the relays. Each is checked
    /// against the payload limit first. They are written in one statement (SQLite: one per 2,000), so outside a
    /// transaction too they are all written or none.
    pub async fn enqueue_envelopes(
        &self,
        conn: &mut DB::Connection,
        envelopes: &[Envelope],
    ) -> Result<(), OutboxError> {
        let limit = self.inner.config.max_payload_bytes;
        for envelope in envelopes {
            envelope.check_payload_limit(limit)?;
        }
        DB::insert_outbox(conn, &self.inner.sql, envelopes, None, Some(&self.wake_local())).await
    }

    /// The envelope `builder` describes, with this outbox's source and payload limit, and its producer span (a
    /// child of the event's trace context, or of the current one, or a new trace).
    fn envelope(&self, builder: EnvelopeBuilder) -> Result<Envelope, OutboxError> {
        let envelope = builder
            .source(self.inner.config.service.clone())
            .max_payload_bytes(self.inner.config.max_payload_bytes)
            .build()?;
        let trace = bus_core::transport::producer_span(envelope.trace(), envelope.event_type().as_str(), envelope.id());
        Ok(envelope.with_trace(trace))
    }

    /// Writes an event in a transaction whose owner knows when it commits ([`OutboxTransaction`], the inbox's
    /// transaction) and then calls [`after_commit`](Self::after_commit) with `dispatch`. Leases the row to the
    /// relay of this process that takes rows directly, when there is one and the row may go direct (see
    /// `direct`).
    pub(crate) async fn write(
        &self,
        conn: &mut DB::Connection,
        builder: EnvelopeBuilder,
        not_before: Option<DateTime<Utc>>,
        dispatch: &mut Dispatch,
    ) -> Result<Uuid, OutboxError> {
        let envelope = self.envelope(builder)?;
        let id = envelope.id();
        let target = match (&dispatch.target, not_before) {
            (_, Some(_)) => None,
            // One relay per transaction: the one its first direct row went to, as long as it still accepts.
            (Some((target, owner)), None) => {
                self.inner.direct.current().filter(|(t, o)| Arc::ptr_eq(t, target) && o == owner)
            }
            (None, None) => self.inner.direct.current(),
        }
        .filter(|(target, _)| dispatch.may_lease(target.per_transaction()));
        // A failed statement aborts the transaction (PostgreSQL): rows leased before it will not commit. The
        // mark is set before the statement and lifted only once it succeeded, so that an enqueue cancelled half-way
        // (its future dropped) also leaves the leased rows to be checked.
        let was_unverified = dispatch.unverified;
        dispatch.touched();
        let leased_insert = match &target {
            Some((target, owner)) => {
                DB::insert_outbox_leased(conn, &self.inner.sql, &envelope, owner, target.lease()).await?
            }
            None => None,
        };
        if let (Some((target, owner)), Some((seq, leased))) = (target, leased_insert) {
            dispatch.unverified = was_unverified;
            dispatch.enqueued += 1;
            if leased {
                dispatch.leased.push(OutboxRow::leased(seq, envelope));
                dispatch.target = Some((target, owner));
            } else {
                dispatch.unleased += 1;
            }
            return Ok(id);
        }
        DB::insert_outbox(conn, &self.inner.sql, std::slice::from_ref(&envelope), not_before, None).await?;
        dispatch.unverified = was_unverified;
        dispatch.enqueued += 1;
        dispatch.unleased += 1;
        Ok(id)
    }

    /// Just before the commit of a transaction that wrote through [`write`](Self::write): makes sure its leased
    /// rows are all still there, so that nothing is handed over for a transaction that aborted (PostgreSQL
    /// turns its COMMIT into a rollback without an error) or a savepoint that was rolled back. Only when
    /// something could have done that: the caller used the connection after the first lease, or an outbox
    /// statement failed; otherwise no query is spent.
    pub(crate) async fn check_leased(&self, conn: &mut DB::Connection, dispatch: &mut Dispatch) {
        let Some((_, owner)) = &dispatch.target else { return };
        // Only the outbox's own statements ran since the first lease, and all succeeded: the rows are there.
        if dispatch.leased.is_empty() || !dispatch.unverified {
            return;
        }
        let seqs = dispatch.leased_seqs();
        if !matches!(DB::leased_rows_present(conn, &self.inner.sql, &seqs, owner).await, Ok(true)) {
            dispatch.forget_leased();
        }
    }

    /// After the commit of a transaction that wrote through [`write`](Self::write): hands its leased rows to
    /// the relay that took them and wakes the relays for the rest.
    pub(crate) fn after_commit(&self, dispatch: Dispatch) {
        if dispatch.after_commit() {
            self.committed();
        }
    }

    /// The slot where a relay of this process offers to take rows directly.
    pub(crate) fn direct(&self) -> &DirectSlot {
        &self.inner.direct
    }

    /// Tells the relays that events were committed: the ones in this process wake at once, others through a
    /// coalesced NOTIFY sent outside any transaction (PostgreSQL). Cheap; call it after every commit that
    /// enqueued something.
    pub fn committed(&self) {
        self.inner.wakeup.committed(&self.inner.pool, &self.inner.sql);
    }

    pub(crate) fn register_relay(&self) -> Arc<tokio::sync::Notify> {
        self.inner.wakeup.register()
    }

    /// Begins a transaction that enqueues through [`OutboxTransaction::enqueue`] and wakes the relay when it
    /// commits.
    pub async fn begin(&self) -> Result<OutboxTransaction<DB>, OutboxError> {
        Ok(OutboxTransaction {
            tx: self.inner.pool.begin().await?,
            outbox: self.clone(),
            dispatch: Dispatch::default(),
        })
    }

    /// What wakes the relays after a commit of the caller's own (it does not keep the outbox alive).
    fn wake_local(&self) -> WakeAtCommit {
        Arc::new(OutboxWake(Arc::downgrade(&self.inner)))
    }

    /// Counts of pending, in-flight, failed and retained rows, and the oldest pending age.
    pub async fn status(&self) -> Result<OutboxStatus, OutboxError> {
        DB::status(&self.inner.pool, &self.inner.sql).await
    }

    /// Events the relay gave up on, oldest first (at most `limit`).
    pub async fn failed(&self, limit: i64) -> Result<Vec<FailedEvent>, OutboxError> {
        DB::failed(&self.inner.pool, &self.inner.sql, limit).await
    }

    /// Puts failed events (one by id, or all) back to pending with fresh attempts, and wakes the relay.
    /// Returns how many were re-queued.
    pub async fn retry_failed(&self, id: Option<Uuid>) -> Result<u64, OutboxError> {
        let count = DB::requeue_failed(&self.inner.pool, &self.inner.sql, id).await?;
        if count > 0 {
            self.committed();
        }
        Ok(count)
    }

    /// Published, retained events with `from_seq < seq <= to_seq` (of `event_type` if given), oldest first, at
    /// most `limit`, with their sequence numbers: the raw material of a replay.
    pub async fn published_events(
        &self,
        from_seq: i64,
        to_seq: i64,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, Envelope)>, OutboxError> {
        let rows = DB::published_range(&self.inner.pool, &self.inner.sql, from_seq, to_seq, event_type, limit).await?;
        rows.iter().map(|r: &OutboxRow| Ok((r.seq, r.to_envelope()?))).collect()
    }

    /// Where a replay from a point in time starts: the sequence number just below the first event enqueued at
    /// or after `since` (pass it as `from_seq` to [`published_events`](Self::published_events)); `None` when no
    /// retained event was enqueued since. Enqueue times come from the database clock. Events of transactions
    /// that overlapped `since` may be included: a replay from a time gives at least every event since then.
    /// (The enqueue time is not indexed: this reads the table once, for an operator command.)
    pub async fn seq_before(&self, since: DateTime<Utc>) -> Result<Option<i64>, OutboxError> {
        Ok(DB::first_seq_since(&self.inner.pool, &self.inner.sql, since).await?.map(|seq| seq - 1))
    }
}

impl<DB: Backend> Outbox<DB> {
    /// Makes the inbox forget every event consumer group `group` handled for event type `event_type`, so that
    /// they are handled again when they are replayed (`busctl replay`): the first step of rebuilding a read model,
    /// together with emptying the model itself. Returns how many inbox rows were deleted.
    ///
    /// # Errors
    /// The database failed.
    pub async fn forget_handled(&self, group: &GroupName, event_type: &EventTypeName) -> Result<u64, OutboxError> {
        let handler = crate::handler_key::handler_key(group.as_str(), event_type.as_str());
        DB::forget_inbox(&self.inner.pool, &self.inner.sql, &handler).await
    }
}

/// The wake-up of an insert on a connection of the caller's own.
struct OutboxWake<DB: Backend>(std::sync::Weak<Inner<DB>>);

impl<DB: Backend> CommitWake for OutboxWake<DB> {
    fn committed(&self) {
        if let Some(inner) = self.0.upgrade() {
            inner.wakeup.wake_local();
        }
    }

    fn committed_with(&self, xid: u64) {
        if let Some(inner) = self.0.upgrade() {
            inner.commits.watch(xid, &inner.pool, &inner.sql, &inner.wakeup);
        }
    }
}

/// A transaction that enqueues events and wakes the relay when it commits.
///
/// It dereferences to the database connection, so business statements run on it as on any sqlx transaction:
/// `sqlx::query(..).execute(&mut *tx)`. Dropped without [`commit`](Self::commit), it rolls back, events
/// included.
pub struct OutboxTransaction<DB: Backend> {
    // Every way SQL reaches `tx` other than `Outbox::write` must call `dispatch.touched()` first (as `deref_mut`
    // does): the pre-commit check of leased rows is skipped when nothing else ran.
    tx: Transaction<'static, DB>,
    outbox: Outbox<DB>,
    dispatch: Dispatch,
}

impl<DB: Backend> OutboxTransaction<DB> {
    /// Enqueues `event` in this transaction; returns its id.
    pub async fn enqueue<E: IntegrationEvent>(&mut self, event: &E) -> Result<Uuid, OutboxError> {
        self.outbox.write(&mut self.tx, Envelope::for_event(event)?, None, &mut self.dispatch).await
    }

    /// Enqueues `event` in this transaction, to be published once `not_before` has come (see
    /// [`Outbox::enqueue_scheduled`] for what holds); returns its id.
    pub async fn enqueue_at<E: IntegrationEvent>(
        &mut self,
        event: &E,
        not_before: DateTime<Utc>,
    ) -> Result<Uuid, OutboxError> {
        self.outbox.write(&mut self.tx, Envelope::for_event(event)?, Some(not_before), &mut self.dispatch).await
    }

    /// Enqueues `event` in this transaction, to be published `delay` from now (this process's clock).
    pub async fn enqueue_after<E: IntegrationEvent>(
        &mut self,
        event: &E,
        delay: std::time::Duration,
    ) -> Result<Uuid, OutboxError> {
        let delay = chrono::Duration::from_std(delay)
            .map_err(|_| OutboxError::config("enqueue_after", format!("a delay of {delay:?} is too long")))?;
        self.enqueue_at(event, Utc::now() + delay).await
    }

    /// Enqueues an event built by `builder` in this transaction.
    pub async fn enqueue_with(&mut self, builder: EnvelopeBuilder) -> Result<Uuid, OutboxError> {
        self.outbox.write(&mut self.tx, builder, None, &mut self.dispatch).await
    }

    /// Commits, then hands the events to the relay of this process (PostgreSQL: at once, without waiting for
    /// its claim; see the crate's `direct` dispatch) or wakes the relays. A commit whose outcome is unknown (the
    /// connection broke) wakes them: whatever committed is claimed.
    pub async fn commit(self) -> Result<(), OutboxError> {
        let Self { mut tx, outbox, mut dispatch } = self;
        outbox.check_leased(&mut tx, &mut dispatch).await;
        match tx.commit().await {
            Ok(()) => {
                outbox.after_commit(dispatch);
                Ok(())
            }
            Err(error) => {
                if dispatch.enqueued > 0 {
                    outbox.committed();
                }
                Err(error.into())
            }
        }
    }

    /// Rolls back: nothing enqueued here is ever published.
    pub async fn rollback(self) -> Result<(), OutboxError> {
        Ok(self.tx.rollback().await?)
    }
}

impl<DB: Backend> std::ops::Deref for OutboxTransaction<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: Backend> std::ops::DerefMut for OutboxTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        // What the caller runs now may abort the transaction or roll back a savepoint holding leased rows.
        self.dispatch.touched();
        &mut self.tx
    }
}

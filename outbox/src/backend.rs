//! [`Backend`]: the databases the outbox runs on (PostgreSQL and SQLite), each with its own SQL.

use std::time::Duration;

use async_trait::async_trait;
use bus_core::Envelope;
use chrono::{DateTime, Utc};
use sqlx::Pool;
use uuid::Uuid;

use crate::dead_letters::StoredDeadLetter;
use crate::error::OutboxError;
use crate::row::{FailedEvent, OutboxRow, OutboxStatus};
use crate::sql::{Dialect, Sql};

mod postgres;
mod relay_lock;
mod sqlite;

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database the outbox supports: [`sqlx::Postgres`] or [`sqlx::Sqlite`]. Sealed; its methods are the outbox's
/// storage operations and are not meant to be called directly.
#[async_trait]
pub trait Backend: sqlx::Database + sealed::Sealed {
    #[doc(hidden)]
    fn dialect() -> Dialect;

    #[doc(hidden)]
    async fn migrate(pool: &Pool<Self>, sql: &Sql) -> Result<(), OutboxError>;

    /// Inserts `envelopes`, to be published from `not_before` on (none: at once), in one statement (SQLite: one
    /// per 2,000 rows), so all rows or none, in or outside a transaction; it never opens one. With `wake`, the
    /// commit wakes the relays: PostgreSQL: the statement returns its transaction id, which `wake` watches until
    /// it ends (no `NOTIFY` inside the caller's transaction, which would serialize committers); SQLite: a
    /// one-shot commit hook on the connection that wakes this process's relays (a rollback leaves it armed: a
    /// later commit wakes them for nothing).
    #[doc(hidden)]
    async fn insert_outbox(
        conn: &mut Self::Connection,
        sql: &Sql,
        envelopes: &[Envelope],
        not_before: Option<DateTime<Utc>>,
        wake: Option<&WakeAtCommit>,
    ) -> Result<(), OutboxError>;

    /// Direct dispatch (see the `direct` module): inserts `envelope`, leased at once to `owner` for `lease` when
    /// it is its key's head (no earlier pending or failed row of its key but those this transaction leased to
    /// the same relay). Returns its sequence number and whether it was leased; `None` when the backend has no
    /// direct dispatch (SQLite), and then nothing was written.
    #[doc(hidden)]
    async fn insert_outbox_leased(
        conn: &mut Self::Connection,
        sql: &Sql,
        envelope: &Envelope,
        owner: &Owner,
        lease: Duration,
    ) -> Result<Option<(i64, bool)>, OutboxError>;

    /// Direct dispatch, just before the commit: whether the rows `seqs` leased to `owner` are all still there in
    /// the transaction on `conn` (an error when the transaction is aborted: PostgreSQL rolls an aborted
    /// transaction back on COMMIT without an error, and a savepoint rollback may have undone some of them).
    #[doc(hidden)]
    async fn leased_rows_present(
        conn: &mut Self::Connection,
        sql: &Sql,
        seqs: &[i64],
        owner: &Owner,
    ) -> Result<bool, OutboxError>;

    /// Of the transactions `xids` (PostgreSQL), the ones a new snapshot sees as ended (committed or rolled back,
    /// and no longer running).
    #[doc(hidden)]
    async fn ended_transactions(pool: &Pool<Self>, xids: &[u64]) -> Result<Vec<u64>, OutboxError>;

    /// Inserts the inbox row; `true` if it is new (the handler must run), `false` for a duplicate.
    #[doc(hidden)]
    async fn insert_inbox(
        conn: &mut Self::Connection,
        sql: &Sql,
        event_id: Uuid,
        handler: &str,
    ) -> Result<bool, OutboxError>;

    /// Claims up to `batch` eligible rows (and at most `max_bytes` of payload, one row at least) for `owner`,
    /// counting an attempt on each. `held` are the rows the relay holds: its own leased rows that it does not
    /// hold (a lost claim result, a failed write-back) are free to claim again. A row that cannot be read back
    /// is failed at once and left out.
    #[doc(hidden)]
    async fn claim(
        pool: &Pool<Self>,
        sql: &Sql,
        owner: &Owner,
        held: &[i64],
        batch: usize,
        max_bytes: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, OutboxError>;

    /// Extends `owner`'s lease on `seqs` (and points them at its current liveness key); returns the rows it
    /// still held.
    #[doc(hidden)]
    async fn renew_lease(
        pool: &Pool<Self>,
        sql: &Sql,
        owner: &Owner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, OutboxError>;

    /// Marks `owner`'s rows `seqs` published; rows it no longer holds are left alone. Returns how many it marked.
    #[doc(hidden)]
    async fn mark_published(pool: &Pool<Self>, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError>;

    /// Records a failed attempt on `owner`'s row: back to pending after `retry_in`, or `failed` when `give_up`.
    /// Returns whether the row was still `owner`'s.
    #[doc(hidden)]
    async fn record_failure(
        pool: &Pool<Self>,
        sql: &Sql,
        owner: &Owner,
        seq: i64,
        error: &str,
        give_up: bool,
        retry_in: Duration,
    ) -> Result<bool, OutboxError>;

    /// Gives `owner`'s rows `seqs` back unpublished, refunding the attempt their claim counted (they were not
    /// tried, or only transport trouble stopped them). Returns how many it still held.
    #[doc(hidden)]
    async fn release(pool: &Pool<Self>, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError>;

    /// Makes `relay` known as alive, for as long as the returned [`Ownership`] is kept (PostgreSQL: a session
    /// advisory lock on a connection of its own; SQLite: a lock on a file of its own, and a registration row).
    #[doc(hidden)]
    async fn hold_ownership(pool: &Pool<Self>, sql: &Sql, relay: Uuid) -> Result<Ownership, OutboxError>;

    /// Proves `owner` is still alive (PostgreSQL: the lock's connection answers; SQLite: the lock is held for the
    /// process's life, so this only reports what the background task found: the registration gone). An error means the
    /// relay may have lost its rows to others: it must stop claiming until it holds a new ownership.
    #[doc(hidden)]
    async fn keep_ownership(pool: &Pool<Self>, sql: &Sql, owner: &mut Ownership) -> Result<(), OutboxError>;

    /// Gives up `owner` (a relay that stops): its remaining rows are free at once.
    #[doc(hidden)]
    async fn drop_ownership(pool: &Pool<Self>, sql: &Sql, owner: Ownership);

    #[doc(hidden)]
    async fn status(pool: &Pool<Self>, sql: &Sql) -> Result<OutboxStatus, OutboxError>;

    #[doc(hidden)]
    async fn failed(pool: &Pool<Self>, sql: &Sql, limit: i64) -> Result<Vec<FailedEvent>, OutboxError>;

    #[doc(hidden)]
    async fn requeue_failed(pool: &Pool<Self>, sql: &Sql, id: Option<Uuid>) -> Result<u64, OutboxError>;

    #[doc(hidden)]
    async fn delete_published(
        pool: &Pool<Self>,
        sql: &Sql,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, OutboxError>;

    #[doc(hidden)]
    async fn delete_inbox(pool: &Pool<Self>, sql: &Sql, older_than: Duration, limit: i64) -> Result<u64, OutboxError>;

    /// Deletes every inbox row of `handler`; returns how many.
    #[doc(hidden)]
    async fn forget_inbox(pool: &Pool<Self>, sql: &Sql, handler: &str) -> Result<u64, OutboxError>;

    /// Published rows with `from < seq <= to` (and of type `event_type` if given), oldest first, for replay.
    #[doc(hidden)]
    async fn published_range(
        pool: &Pool<Self>,
        sql: &Sql,
        from: i64,
        to: i64,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, OutboxError>;

    /// The lowest sequence number of the rows enqueued at or after `since` (none: no such row).
    #[doc(hidden)]
    async fn first_seq_since(pool: &Pool<Self>, sql: &Sql, since: DateTime<Utc>) -> Result<Option<i64>, OutboxError>;

    /// Stores a dead letter, replacing the one of the same group and event.
    #[doc(hidden)]
    async fn keep_dead_letter(pool: &Pool<Self>, sql: &Sql, letter: &StoredDeadLetter) -> Result<(), OutboxError>;

    /// The dead letters of `group`, oldest first.
    #[doc(hidden)]
    async fn dead_letters(pool: &Pool<Self>, sql: &Sql, group: &str) -> Result<Vec<StoredDeadLetter>, OutboxError>;

    /// Removes `letter` if it is stored as given (same `failed_at`).
    #[doc(hidden)]
    async fn remove_dead_letter(pool: &Pool<Self>, sql: &Sql, letter: &StoredDeadLetter) -> Result<bool, OutboxError>;

    /// Wakes relays in other processes (PostgreSQL `NOTIFY`; nothing on SQLite).
    #[doc(hidden)]
    async fn notify(pool: &Pool<Self>, sql: &Sql) -> Result<(), OutboxError>;

    /// Runs until `stop`: wakes `wake` on every notification on the outbox channel (PostgreSQL `LISTEN`,
    /// reconnecting as needed, with a wake after each reconnect since notifications may have been lost), and
    /// keeps `listening` true while connected. Returns at once on SQLite, where producers and relays share a
    /// process (and `listening` is set true: there is nothing to wait for).
    #[doc(hidden)]
    async fn listen(
        pool: &Pool<Self>,
        sql: &Sql,
        wake: std::sync::Arc<tokio::sync::Notify>,
        listening: tokio::sync::watch::Sender<bool>,
        stop: tokio_util::sync::CancellationToken,
    );
}

/// How an insert on a connection of the caller's own tells the outbox's wake-up about the commit that makes its
/// rows visible (without keeping the outbox alive).
#[doc(hidden)]
pub trait CommitWake: Send + Sync {
    /// The rows are committed now (SQLite's commit hook).
    fn committed(&self);
    /// The rows are visible once PostgreSQL transaction `xid` commits.
    fn committed_with(&self, xid: u64);
}

/// The wake-up an insert gets.
#[doc(hidden)]
pub type WakeAtCommit = std::sync::Arc<dyn CommitWake>;

/// A relay's proof of liveness: while it is held, other relays leave the relay's leased rows alone until their
/// lease ends; once it is gone (process killed, connection lost), they take the rows over at once.
#[doc(hidden)]
pub struct Ownership {
    /// Who the relay is, as its rows name it.
    pub(crate) owner: Owner,
    /// PostgreSQL: the connection that holds the session lock, for the relay's life.
    pub(crate) connection: Option<sqlx::PgConnection>,
    /// SQLite: the relay's file lock and the task that keeps its registration.
    pub(crate) sqlite: Option<sqlite::SqliteProof>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership").field("owner", &self.owner).finish_non_exhaustive()
    }
}

/// How a relay's rows name it: what claims write and what results are fenced by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[doc(hidden)]
pub struct Owner {
    /// The relay's id, written as `locked_by` in the rows it claims; results only touch rows it still holds.
    pub(crate) relay: Uuid,
    /// PostgreSQL: the advisory lock's key (second half; the first is `namespace`), written as `locked_key`.
    pub(crate) key: i32,
    /// PostgreSQL: the advisory lock namespace of this outbox table.
    pub(crate) namespace: i32,
}

/// A JSON array of sequence numbers, for SQLite's `json_each`.
pub(crate) fn json_list(seqs: &[i64]) -> String {
    format!("[{}]", seqs.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

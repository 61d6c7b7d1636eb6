//! SQLite: one writer at a time, so a claim is one `UPDATE … RETURNING` statement (atomic on its own); times are
//! Unix milliseconds from SQLite's clock, read when each statement runs; the relay shares the producers' process, so no NOTIFY.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::Envelope;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Executor, Row, Sqlite, SqlitePool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::relay_lock::{LockPlace, Probe, RelayLock};
use super::{Backend, Owner, Ownership, from_ms, json_list, millis};
use crate::dead_letters::StoredDeadLetter;
use crate::error::OutboxError;
use crate::row::{FailedEvent, OutboxRow, OutboxStatus};
use crate::sql::{Dialect, MIGRATIONS, NOW, SQLITE_PROOF_INTERVAL_MS, SQLITE_REGISTRATION_REFRESH_MS, Sql};

/// SQLite's side of a relay's liveness proof, beside its lock: a task that, every
/// [`SQLITE_PROOF_INTERVAL_MS`], forgets the other relays found dead and checks that the relay's own
/// registration is still there (refreshing it every [`SQLITE_REGISTRATION_REFRESH_MS`]). The proof itself is the
/// lock, so a database busy for seconds delays this work but never makes the relay look dead to itself.
pub(crate) struct SqliteProof {
    lock: Option<RelayLock>,
    janitor: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

impl Drop for SqliteProof {
    fn drop(&mut self) {
        self.janitor.abort();
    }
}

/// The statements the janitor runs, owned by its task.
struct JanitorSql {
    registered_relays: String,
    forget_registration: String,
    refresh_relay: String,
}

/// Rows per insert statement: 12 parameters each, within SQLite's 32,766.
const SQLITE_ROWS_PER_INSERT: usize = 2_000;

/// The file SQLite opened as the main database (empty for an in-memory one): the same for every process that
/// opens it, whatever URL, URI or relative path each was given.
async fn main_database_file(pool: &SqlitePool) -> Result<String, OutboxError> {
    let databases: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list").fetch_all(pool).await?;
    Ok(databases.into_iter().find(|(_, name, _)| name == "main").map(|(_, _, file)| file).unwrap_or_default())
}

/// Takes the relay's lock, waiting (a few seconds at most) while a prober buries a previous life of this relay.
async fn acquire_lock(place: &LockPlace, relay: Uuid) -> Result<RelayLock, OutboxError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match place.acquire(relay) {
            Ok(lock) => return Ok(lock),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => {
                return Err(OutboxError::config(
                    "relay",
                    format!("cannot hold the relay's lock file beside the database: {error}"),
                ));
            }
        }
    }
}

async fn keep_registration(pool: SqlitePool, sql: JanitorSql, relay: Uuid, place: LockPlace, lost: Arc<AtomicBool>) {
    let refresh_every = Duration::from_millis(SQLITE_REGISTRATION_REFRESH_MS.unsigned_abs());
    let mut refreshed = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(SQLITE_PROOF_INTERVAL_MS.unsigned_abs())).await;
        match forget_dead_relays(&pool, &sql, relay, &place).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(%relay, "the relay's registration was removed by someone else");
                lost.store(true, Ordering::Release);
                return;
            }
            Err(error) => tracing::debug!(%relay, %error, "could not look for dead relays; trying again"),
        }
        if refreshed.elapsed() >= refresh_every {
            match sqlx::query(&sql.refresh_relay).bind(relay.to_string()).execute(&pool).await {
                Ok(done) if done.rows_affected() == 0 => {
                    tracing::warn!(%relay, "the relay's registration was removed by someone else");
                    lost.store(true, Ordering::Release);
                    return;
                }
                Ok(_) => refreshed = Instant::now(),
                Err(error) => tracing::debug!(%relay, %error, "could not refresh the relay's registration"),
            }
        }
    }
}

/// Removes the registrations of the other relays found dead (their lock is free; or, for a relay whose lock file
/// this process cannot see, no refresh for a minute): their rows are free at the next claim. A dead relay's lock
/// stays held until its registration is deleted, and the delete only removes the registration as it was read,
/// so that a relay coming back under its id (a newer registration) is never the one forgotten, even by a delete
/// that lands late (its task aborted while SQLite still runs it). `false` if `relay`'s own registration is gone.
async fn forget_dead_relays(
    pool: &SqlitePool,
    sql: &JanitorSql,
    relay: Uuid,
    place: &LockPlace,
) -> Result<bool, OutboxError> {
    let registered: Vec<(String, i64, bool)> = sqlx::query_as(&sql.registered_relays).fetch_all(pool).await?;
    let mut registered_self = false;
    for (id, heartbeat_at, unseen_for_long) in registered {
        let forget = || sqlx::query(&sql.forget_registration).bind(&id).bind(heartbeat_at).execute(pool);
        let Ok(other) = Uuid::parse_str(&id) else {
            if unseen_for_long {
                forget().await?;
            }
            continue;
        };
        if other == relay {
            registered_self = true;
            continue;
        }
        let dead = match place.probe(other) {
            Probe::Alive => continue,
            Probe::Dead(dead) => Some(dead),
            Probe::Unknown if unseen_for_long => None,
            Probe::Unknown => continue,
        };
        // A relay registers only once it holds its lock, so while `dead` holds it the registration read is the
        // current one (or gone): either way the file can go. Without the lock (an unseen relay), a newer
        // registration survives the delete.
        if forget().await?.rows_affected() > 0 {
            tracing::info!(%relay, dead = %id, "a relay is gone: its rows are free");
        }
        if let Some(dead) = dead {
            dead.bury();
        }
    }
    Ok(registered_self)
}

fn parse_uuid(seq: i64, value: &str) -> Result<Uuid, OutboxError> {
    Uuid::parse_str(value).map_err(|e| OutboxError::CorruptRow { seq, reason: format!("bad uuid {value:?}: {e}") })
}

fn row(r: &SqliteRow) -> Result<OutboxRow, OutboxError> {
    let seq: i64 = r.try_get("seq")?;
    let event_id: String = r.try_get("event_id")?;
    let causation_id: Option<String> = r.try_get("causation_id")?;
    Ok(OutboxRow {
        seq,
        event_id: parse_uuid(seq, &event_id)?,
        event_type: r.try_get("event_type")?,
        version: r.try_get("version")?,
        occurred_at: from_ms(r.try_get("occurred_at")?),
        correlation_id: r.try_get("correlation_id")?,
        causation_id: causation_id.map(|c| parse_uuid(seq, &c)).transpose()?,
        partition_key: r.try_get("partition_key")?,
        source: r.try_get("source")?,
        traceparent: r.try_get("traceparent")?,
        tracestate: r.try_get("tracestate")?,
        payload: r.try_get("payload")?,
        attempts: r.try_get("attempts")?,
    })
}

crate::dead_letters::dead_letter_statements!(SqlitePool, SqliteRow);

#[async_trait]
impl Backend for Sqlite {
    fn dialect() -> Dialect {
        Dialect::Sqlite
    }

    async fn migrate(pool: &SqlitePool, sql: &Sql) -> Result<(), OutboxError> {
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {} (version INTEGER PRIMARY KEY, description TEXT NOT NULL, \
             applied_at INTEGER NOT NULL)",
            sql.migrations
        );
        let select_applied = format!("SELECT version FROM {}", sql.migrations);
        let record =
            format!("INSERT INTO {} (version, description, applied_at) VALUES (?1, ?2, {NOW})", sql.migrations);
        let mut conn = pool.acquire().await?;
        // BEGIN IMMEDIATE takes the write lock first, so concurrent migrators run one after the other.
        conn.execute("BEGIN IMMEDIATE").await?;
        let result = migrate_locked(&mut conn, sql, &create_table, &select_applied, &record).await;
        match result {
            Ok(()) => {
                conn.execute("COMMIT").await?;
                Ok(())
            }
            Err(error) => {
                let _ = conn.execute("ROLLBACK").await;
                Err(error)
            }
        }
    }

    async fn insert_outbox(
        conn: &mut SqliteConnection,
        sql: &Sql,
        envelopes: &[Envelope],
        not_before: Option<chrono::DateTime<chrono::Utc>>,
        wake: Option<&super::WakeAtCommit>,
    ) -> Result<(), OutboxError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        if let Some(wakeup) = wake {
            // Wake at the commit, whichever it is: the caller's, or the insert's own outside a transaction (a
            // connection has one commit hook: this replaces any the application set on it).
            let wakeup = wakeup.clone();
            let mut armed = true;
            conn.lock_handle().await?.set_commit_hook(move || {
                if std::mem::take(&mut armed) {
                    // A panic here would turn the commit into a rollback: never let one out.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wakeup.committed()));
                }
                true
            });
        }
        // One statement per chunk of rows, so that they are all written or none (up to a chunk) whether `conn`
        // is in a transaction or not (a raw `BEGIN` of the caller's is no transaction sqlx knows of: none is
        // opened here).
        for chunk in envelopes.chunks(SQLITE_ROWS_PER_INSERT) {
            let text = match chunk {
                [_] => std::borrow::Cow::Borrowed(sql.insert_outbox.as_str()),
                rows => std::borrow::Cow::Owned(format!(
                    "{}{}",
                    sql.insert_outbox_rows,
                    vec![sql.insert_outbox_values.as_str(); rows.len()].join(", ")
                )),
            };
            let mut statement = sqlx::query(&text);
            for e in chunk {
                statement = statement
                    .bind(e.id().to_string())
                    .bind(e.event_type().as_str())
                    .bind(i64::from(e.version()))
                    .bind(e.occurred_at().timestamp_millis())
                    .bind(e.correlation_id())
                    .bind(e.causation_id().map(|c| c.to_string()))
                    .bind(e.partition_key())
                    .bind(e.source())
                    .bind(e.trace().traceparent())
                    .bind(e.trace().tracestate())
                    .bind(e.payload().as_ref())
                    .bind(not_before.map(|t| t.timestamp_millis()));
            }
            statement.execute(&mut *conn).await?;
        }
        Ok(())
    }

    async fn insert_outbox_leased(
        _conn: &mut SqliteConnection,
        _sql: &Sql,
        _envelope: &Envelope,
        _owner: &Owner,
        _lease: Duration,
    ) -> Result<Option<(i64, bool)>, OutboxError> {
        Ok(None)
    }

    async fn leased_rows_present(
        _conn: &mut SqliteConnection,
        _sql: &Sql,
        seqs: &[i64],
        _owner: &Owner,
    ) -> Result<bool, OutboxError> {
        Ok(seqs.is_empty())
    }

    async fn ended_transactions(_pool: &SqlitePool, xids: &[u64]) -> Result<Vec<u64>, OutboxError> {
        Ok(xids.to_vec())
    }

    async fn insert_inbox(
        conn: &mut SqliteConnection,
        sql: &Sql,
        event_id: Uuid,
        handler: &str,
    ) -> Result<bool, OutboxError> {
        let done = sqlx::query(&sql.insert_inbox).bind(event_id.to_string()).bind(handler).execute(&mut *conn).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim(
        pool: &SqlitePool,
        sql: &Sql,
        owner: &Owner,
        held: &[i64],
        batch: usize,
        max_bytes: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let rows = sqlx::query(&sql.claim)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .bind(owner.relay.to_string())
            .bind(millis(lease))
            .bind(owner.key)
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .bind(json_list(held))
            .fetch_all(pool)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for r in &rows {
            match row(r) {
                Ok(row) => claimed.push(row),
                // One row that cannot be read back fails alone (with its reason); the others go on.
                Err(OutboxError::CorruptRow { seq, reason }) => {
                    tracing::error!(seq, %reason, "outbox row cannot be read back; marked failed");
                    Self::record_failure(pool, sql, owner, seq, &reason, true, Duration::ZERO).await?;
                }
                Err(error) => return Err(error),
            }
        }
        claimed.sort_unstable_by_key(|r| r.seq);
        Ok(claimed)
    }

    async fn renew_lease(
        pool: &SqlitePool,
        sql: &Sql,
        owner: &Owner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, OutboxError> {
        let held = sqlx::query_scalar(&sql.renew_lease)
            .bind(json_list(seqs))
            .bind(owner.relay.to_string())
            .bind(millis(lease))
            .bind(owner.key)
            .fetch_all(pool)
            .await?;
        Ok(held)
    }

    async fn mark_published(pool: &SqlitePool, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError> {
        let done =
            sqlx::query(&sql.mark_published).bind(json_list(seqs)).bind(owner.relay.to_string()).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn record_failure(
        pool: &SqlitePool,
        sql: &Sql,
        owner: &Owner,
        seq: i64,
        error: &str,
        give_up: bool,
        retry_in: Duration,
    ) -> Result<bool, OutboxError> {
        let done = sqlx::query(&sql.record_failure)
            .bind(seq)
            .bind(owner.relay.to_string())
            .bind(error)
            .bind(give_up)
            .bind(millis(retry_in))
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(pool: &SqlitePool, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError> {
        let done = sqlx::query(&sql.release).bind(json_list(seqs)).bind(owner.relay.to_string()).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn hold_ownership(pool: &SqlitePool, sql: &Sql, relay: Uuid) -> Result<Ownership, OutboxError> {
        // The lock first, then the registration: whoever sees the registration can probe the lock.
        let database = main_database_file(pool).await?;
        let place = LockPlace::beside(&database).map_err(|error| {
            OutboxError::config("relay", format!("cannot place the relay's lock file beside the database: {error}"))
        })?;
        let lock = acquire_lock(&place, relay).await?;
        sqlx::query(&sql.register_relay).bind(relay.to_string()).execute(pool).await?;
        let lost = Arc::new(AtomicBool::new(false));
        let janitor_sql = JanitorSql {
            registered_relays: sql.registered_relays.clone(),
            forget_registration: sql.forget_registration.clone(),
            refresh_relay: sql.refresh_relay.clone(),
        };
        let janitor = tokio::spawn(keep_registration(pool.clone(), janitor_sql, relay, place, lost.clone()));
        Ok(Ownership {
            owner: Owner { relay, key: 0, namespace: 0 },
            connection: None,
            sqlite: Some(SqliteProof { lock: Some(lock), janitor, lost }),
        })
    }

    async fn keep_ownership(_pool: &SqlitePool, _sql: &Sql, owner: &mut Ownership) -> Result<(), OutboxError> {
        // The proof is the lock, held as long as the process lives; the janitor says if the registration is gone.
        let Some(proof) = &owner.sqlite else { return Ok(()) };
        if proof.lost.load(Ordering::Acquire) {
            return Err(OutboxError::config("relay", "the relay's registration was removed by someone else"));
        }
        if proof.janitor.is_finished() {
            return Err(OutboxError::config("relay", "the task that keeps the relay's registration stopped"));
        }
        Ok(())
    }

    async fn drop_ownership(pool: &SqlitePool, sql: &Sql, owner: Ownership) {
        let Some(mut proof) = owner.sqlite else { return };
        proof.janitor.abort();
        let _ = (&mut proof.janitor).await;
        match sqlx::query(&sql.forget_relay).bind(owner.owner.relay.to_string()).execute(pool).await {
            Ok(_) => {
                if let Some(lock) = proof.lock.take() {
                    lock.release();
                }
            }
            // The lock file stays (unlocked) for the other relays to find this one dead and forget it.
            Err(error) => tracing::debug!(%error, "could not remove the relay's registration"),
        }
    }

    async fn status(pool: &SqlitePool, sql: &Sql) -> Result<OutboxStatus, OutboxError> {
        let r = sqlx::query(&sql.status).fetch_one(pool).await?;
        Ok(OutboxStatus {
            pending: r.try_get(0)?,
            in_flight: r.try_get(1)?,
            failed: r.try_get(2)?,
            published: r.try_get(3)?,
            oldest_pending_ms: r.try_get(4)?,
            parked_keys: r.try_get(5)?,
            scheduled: r.try_get(6)?,
        })
    }

    async fn failed(pool: &SqlitePool, sql: &Sql, limit: i64) -> Result<Vec<FailedEvent>, OutboxError> {
        let rows = sqlx::query(&sql.failed).bind(limit).fetch_all(pool).await?;
        rows.iter().map(|r| Ok(FailedEvent::from_row(row(r)?, r.try_get("last_error")?))).collect()
    }

    async fn requeue_failed(pool: &SqlitePool, sql: &Sql, id: Option<Uuid>) -> Result<u64, OutboxError> {
        let done = sqlx::query(&sql.requeue_failed).bind(id.map(|i| i.to_string())).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn delete_published(
        pool: &SqlitePool,
        sql: &Sql,
        older_than: Duration,
        limit: i64,
    ) -> Result<u64, OutboxError> {
        let done = sqlx::query(&sql.delete_published).bind(millis(older_than)).bind(limit).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn delete_inbox(pool: &SqlitePool, sql: &Sql, older_than: Duration, limit: i64) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.delete_inbox).bind(millis(older_than)).bind(limit).execute(pool).await?.rows_affected())
    }

    async fn forget_inbox(pool: &SqlitePool, sql: &Sql, handler: &str) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.forget_inbox).bind(handler).execute(pool).await?.rows_affected())
    }

    async fn published_range(
        pool: &SqlitePool,
        sql: &Sql,
        from: i64,
        to: i64,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let rows =
            sqlx::query(&sql.select_range).bind(from).bind(to).bind(event_type).bind(limit).fetch_all(pool).await?;
        rows.iter().map(row).collect()
    }

    async fn first_seq_since(
        pool: &SqlitePool,
        sql: &Sql,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<i64>, OutboxError> {
        Ok(sqlx::query_scalar(&sql.first_seq_since).bind(since.timestamp_millis()).fetch_one(pool).await?)
    }

    async fn keep_dead_letter(pool: &SqlitePool, sql: &Sql, letter: &StoredDeadLetter) -> Result<(), OutboxError> {
        keep_dead_letter_row(pool, sql, letter).await
    }

    async fn dead_letters(pool: &SqlitePool, sql: &Sql, group: &str) -> Result<Vec<StoredDeadLetter>, OutboxError> {
        dead_letter_rows(pool, sql, group).await
    }

    async fn remove_dead_letter(pool: &SqlitePool, sql: &Sql, letter: &StoredDeadLetter) -> Result<bool, OutboxError> {
        remove_dead_letter_row(pool, sql, letter).await
    }

    async fn notify(_pool: &SqlitePool, _sql: &Sql) -> Result<(), OutboxError> {
        Ok(())
    }

    async fn listen(
        _pool: &SqlitePool,
        _sql: &Sql,
        _wake: Arc<Notify>,
        listening: tokio::sync::watch::Sender<bool>,
        _stop: CancellationToken,
    ) {
        listening.send_replace(true);
    }
}

async fn migrate_locked(
    conn: &mut SqliteConnection,
    sql: &Sql,
    create_table: &str,
    select_applied: &str,
    record: &str,
) -> Result<(), OutboxError> {
    conn.execute(create_table).await?;
    let applied: Vec<i64> = sqlx::query_scalar(select_applied).fetch_all(&mut *conn).await?;
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let fail =
            |source| OutboxError::Migration { version: migration.version, description: migration.description, source };
        let ddl = (migration.sql)(sql, Dialect::Sqlite);
        conn.execute(ddl.as_str()).await.map_err(fail)?;
        sqlx::query(record)
            .bind(migration.version)
            .bind(migration.description)
            .execute(&mut *conn)
            .await
            .map_err(fail)?;
        tracing::info!(version = migration.version, description = migration.description, "outbox migration applied");
    }
    Ok(())
}

//! PostgreSQL: `FOR UPDATE SKIP LOCKED` claims, server-side clock, `LISTEN/NOTIFY` wake-ups.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bus_core::Envelope;
use sqlx::postgres::{PgConnection, PgListener, PgRow};
use sqlx::{Connection, Executor, PgPool, Postgres, Row};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Backend, Owner, Ownership, millis};

/// How long the liveness connection may take to answer a ping before the relay counts it as lost.
const OWNERSHIP_PING_TIMEOUT: Duration = Duration::from_secs(5);
use crate::dead_letters::StoredDeadLetter;
use crate::error::OutboxError;
use crate::row::{FailedEvent, OutboxRow, OutboxStatus};
use crate::sql::{Dialect, MIGRATIONS, Sql};

fn row(r: &PgRow) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        seq: r.try_get("seq")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        version: r.try_get("version")?,
        occurred_at: r.try_get("occurred_at")?,
        correlation_id: r.try_get("correlation_id")?,
        causation_id: r.try_get("causation_id")?,
        partition_key: r.try_get("partition_key")?,
        source: r.try_get("source")?,
        traceparent: r.try_get("traceparent")?,
        tracestate: r.try_get("tracestate")?,
        payload: r.try_get("payload")?,
        attempts: r.try_get("attempts")?,
    })
}

crate::dead_letters::dead_letter_statements!(PgPool, PgRow);

/// One envelope's columns as parameters `$1`..`$11` of a single-row insert.
fn bind_envelope<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    e: &'q Envelope,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    query
        .bind(e.id())
        .bind(e.event_type().as_str())
        .bind(i32::try_from(e.version()).unwrap_or(i32::MAX))
        .bind(e.occurred_at())
        .bind(e.correlation_id())
        .bind(e.causation_id())
        .bind(e.partition_key())
        .bind(e.source())
        .bind(e.trace().traceparent())
        .bind(e.trace().tracestate())
        .bind(e.payload().as_ref())
}

#[async_trait]
impl Backend for Postgres {
    fn dialect() -> Dialect {
        Dialect::Postgres
    }

    async fn migrate(pool: &PgPool, sql: &Sql) -> Result<(), OutboxError> {
        let create_schema = sql.schema.as_ref().map(|schema| format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""));
        let create_table = format!(
            "CREATE TABLE IF NOT EXISTS {} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            sql.migrations
        );
        let select_applied = format!("SELECT version FROM {}", sql.migrations);
        let record = format!("INSERT INTO {} (version, description) VALUES ($1, $2)", sql.migrations);
        let mut tx = pool.begin().await?;
        // Serialize concurrent migrators (several instances starting at once).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))").bind(&sql.migrations).execute(&mut *tx).await?;
        if let Some(create_schema) = &create_schema {
            tx.execute(create_schema.as_str()).await?;
        }
        tx.execute(create_table.as_str()).await?;
        let applied: Vec<i64> = sqlx::query_scalar(&select_applied).fetch_all(&mut *tx).await?;
        for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            let ddl = (migration.sql)(sql, Dialect::Postgres);
            let fail = |source| OutboxError::Migration {
                version: migration.version,
                description: migration.description,
                source,
            };
            tx.execute(ddl.as_str()).await.map_err(fail)?;
            sqlx::query(&record)
                .bind(migration.version)
                .bind(migration.description)
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
            tracing::info!(
                version = migration.version,
                description = migration.description,
                "outbox migration applied"
            );
        }
        tx.commit().await?;
        Ok(())
    }

    async fn insert_outbox(
        conn: &mut PgConnection,
        sql: &Sql,
        envelopes: &[Envelope],
        not_before: Option<chrono::DateTime<chrono::Utc>>,
        wake: Option<&super::WakeAtCommit>,
    ) -> Result<(), OutboxError> {
        // One statement, so that the rows are all written or none, whether `conn` is in a transaction or not (a
        // raw `BEGIN` of the caller's is no transaction sqlx knows of: none is opened here). With `wake`, it
        // returns its transaction id, watched until it commits (see `commit_watch`).
        let statement = match (envelopes, wake.is_some()) {
            ([], _) => return Ok(()),
            ([e], waking) => {
                bind_envelope(sqlx::query(if waking { &sql.insert_outbox_waking } else { &sql.insert_outbox }), e)
                    .bind(not_before)
            }
            (many, waking) => {
                sqlx::query(if waking { &sql.insert_outbox_rows_waking } else { &sql.insert_outbox_rows })
                    .bind(many.iter().map(Envelope::id).collect::<Vec<_>>())
                    .bind(many.iter().map(|e| e.event_type().as_str()).collect::<Vec<_>>())
                    .bind(many.iter().map(|e| i32::try_from(e.version()).unwrap_or(i32::MAX)).collect::<Vec<_>>())
                    .bind(many.iter().map(Envelope::occurred_at).collect::<Vec<_>>())
                    .bind(many.iter().map(Envelope::correlation_id).collect::<Vec<_>>())
                    .bind(many.iter().map(Envelope::causation_id).collect::<Vec<_>>())
                    .bind(many.iter().map(Envelope::partition_key).collect::<Vec<_>>())
                    .bind(many.iter().map(Envelope::source).collect::<Vec<_>>())
                    .bind(many.iter().map(|e| e.trace().traceparent()).collect::<Vec<_>>())
                    .bind(many.iter().map(|e| e.trace().tracestate()).collect::<Vec<_>>())
                    .bind(many.iter().map(|e| e.payload().as_ref()).collect::<Vec<&[u8]>>())
                    .bind(not_before)
            }
        };
        match wake {
            None => {
                statement.execute(&mut *conn).await?;
            }
            Some(wake) => {
                let xid: Option<String> = statement.fetch_optional(&mut *conn).await?.map(|row| row.get(0));
                match xid.and_then(|x| x.parse::<u64>().ok()) {
                    Some(xid) => wake.committed_with(xid),
                    None => wake.committed(),
                }
            }
        }
        Ok(())
    }

    async fn insert_outbox_leased(
        conn: &mut PgConnection,
        sql: &Sql,
        e: &Envelope,
        owner: &Owner,
        lease: Duration,
    ) -> Result<Option<(i64, bool)>, OutboxError> {
        let row = bind_envelope(sqlx::query(&sql.insert_outbox_leased), e)
            .bind(owner.relay)
            .bind(owner.key)
            .bind(millis(lease) as f64)
            .fetch_one(&mut *conn)
            .await?;
        Ok(Some((row.try_get("seq")?, row.try_get("leased")?)))
    }

    async fn leased_rows_present(
        conn: &mut PgConnection,
        sql: &Sql,
        seqs: &[i64],
        owner: &Owner,
    ) -> Result<bool, OutboxError> {
        let statement = format!("SELECT count(*) FROM {} WHERE seq = ANY($1) AND locked_by = $2", sql.outbox);
        let present: i64 = sqlx::query_scalar(&statement).bind(seqs).bind(owner.relay).fetch_one(&mut *conn).await?;
        Ok(usize::try_from(present).unwrap_or(0) == seqs.len())
    }

    async fn ended_transactions(pool: &PgPool, xids: &[u64]) -> Result<Vec<u64>, OutboxError> {
        let xids: Vec<String> = xids.iter().map(u64::to_string).collect();
        let ended: Vec<String> = sqlx::query_scalar(
            "SELECT x FROM unnest($1::text[]) AS t(x) WHERE pg_visible_in_snapshot(x::xid8, pg_current_snapshot())",
        )
        .bind(xids)
        .fetch_all(pool)
        .await?;
        Ok(ended.iter().filter_map(|x| x.parse().ok()).collect())
    }

    async fn insert_inbox(
        conn: &mut PgConnection,
        sql: &Sql,
        event_id: Uuid,
        handler: &str,
    ) -> Result<bool, OutboxError> {
        let done = sqlx::query(&sql.insert_inbox).bind(event_id).bind(handler).execute(&mut *conn).await?;
        Ok(done.rows_affected() == 1)
    }

    async fn claim(
        pool: &PgPool,
        sql: &Sql,
        owner: &Owner,
        held: &[i64],
        batch: usize,
        max_bytes: usize,
        lease: Duration,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        // The claim must walk the pending rows in `seq` order and stop at its batch: on a table whose statistics
        // lag behind a fast-growing backlog, the planner would rather read every pending row, and check each
        // one's earlier rows of its key, before sorting (quadratic: 40 s for 100,000 rows of 100 keys). Only
        // index scans, for this statement's transaction.
        let mut tx =
            pool.begin_with("BEGIN; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_seqscan = off").await?;
        let conn: &mut PgConnection = &mut tx;
        let rows = sqlx::query(&sql.claim)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .bind(owner.relay)
            .bind(millis(lease) as f64)
            .bind(owner.key)
            .bind(i64::try_from(max_bytes).unwrap_or(i64::MAX))
            .bind(owner.namespace)
            .bind(held)
            .fetch_all(&mut *conn)
            .await?;
        tx.commit().await?;
        let mut rows = rows.iter().map(row).collect::<Result<Vec<_>, _>>()?;
        rows.sort_unstable_by_key(|r| r.seq);
        Ok(rows)
    }

    async fn renew_lease(
        pool: &PgPool,
        sql: &Sql,
        owner: &Owner,
        seqs: &[i64],
        lease: Duration,
    ) -> Result<Vec<i64>, OutboxError> {
        let held = sqlx::query_scalar(&sql.renew_lease)
            .bind(seqs)
            .bind(owner.relay)
            .bind(millis(lease) as f64)
            .bind(owner.key)
            .fetch_all(pool)
            .await?;
        Ok(held)
    }

    async fn mark_published(pool: &PgPool, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.mark_published).bind(seqs).bind(owner.relay).execute(pool).await?.rows_affected())
    }

    async fn record_failure(
        pool: &PgPool,
        sql: &Sql,
        owner: &Owner,
        seq: i64,
        error: &str,
        give_up: bool,
        retry_in: Duration,
    ) -> Result<bool, OutboxError> {
        let done = sqlx::query(&sql.record_failure)
            .bind(seq)
            .bind(owner.relay)
            .bind(error)
            .bind(give_up)
            .bind(millis(retry_in) as f64)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(pool: &PgPool, sql: &Sql, owner: &Owner, seqs: &[i64]) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.release).bind(seqs).bind(owner.relay).execute(pool).await?.rows_affected())
    }

    async fn hold_ownership(pool: &PgPool, sql: &Sql, relay: Uuid) -> Result<Ownership, OutboxError> {
        // A connection of its own, outside the pool, for the relay's life: when the process dies or the
        // connection drops, PostgreSQL frees the lock and other relays' claims see the rows as free.
        let options = pool.connect_options();
        let connect = PgConnection::connect_with(&options);
        let mut connection = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| OutboxError::Database(sqlx::Error::PoolTimedOut))??;
        let namespace: i32 =
            sqlx::query_scalar("SELECT hashtext($1)").bind(&sql.outbox).fetch_one(&mut connection).await?;
        for _ in 0..16 {
            let key = fastrand::i32(..);
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(namespace)
                .bind(key)
                .fetch_one(&mut connection)
                .await?;
            if locked {
                return Ok(Ownership {
                    owner: Owner { relay, key, namespace },
                    connection: Some(connection),
                    sqlite: None,
                });
            }
        }
        Err(OutboxError::config("relay", "no free advisory lock key after 16 tries (too many relays?)"))
    }

    async fn keep_ownership(_pool: &PgPool, _sql: &Sql, owner: &mut Ownership) -> Result<(), OutboxError> {
        let Some(connection) = owner.connection.as_mut() else {
            return Err(OutboxError::Database(sqlx::Error::PoolClosed));
        };
        match tokio::time::timeout(OWNERSHIP_PING_TIMEOUT, connection.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => {
                owner.connection = None;
                Err(error.into())
            }
            Err(_) => {
                owner.connection = None;
                Err(OutboxError::Database(sqlx::Error::PoolTimedOut))
            }
        }
    }

    async fn drop_ownership(_pool: &PgPool, _sql: &Sql, owner: Ownership) {
        if let Some(connection) = owner.connection {
            // Closing the session frees its advisory lock.
            let _ = tokio::time::timeout(OWNERSHIP_PING_TIMEOUT, connection.close()).await;
        }
    }

    async fn status(pool: &PgPool, sql: &Sql) -> Result<OutboxStatus, OutboxError> {
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

    async fn failed(pool: &PgPool, sql: &Sql, limit: i64) -> Result<Vec<FailedEvent>, OutboxError> {
        let rows = sqlx::query(&sql.failed).bind(limit).fetch_all(pool).await?;
        rows.iter().map(|r| Ok(FailedEvent::from_row(row(r)?, r.try_get("last_error")?))).collect()
    }

    async fn requeue_failed(pool: &PgPool, sql: &Sql, id: Option<Uuid>) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.requeue_failed).bind(id).execute(pool).await?.rows_affected())
    }

    async fn delete_published(pool: &PgPool, sql: &Sql, older_than: Duration, limit: i64) -> Result<u64, OutboxError> {
        let done = sqlx::query(&sql.delete_published).bind(millis(older_than) as f64).bind(limit).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn delete_inbox(pool: &PgPool, sql: &Sql, older_than: Duration, limit: i64) -> Result<u64, OutboxError> {
        let done = sqlx::query(&sql.delete_inbox).bind(millis(older_than) as f64).bind(limit).execute(pool).await?;
        Ok(done.rows_affected())
    }

    async fn forget_inbox(pool: &PgPool, sql: &Sql, handler: &str) -> Result<u64, OutboxError> {
        Ok(sqlx::query(&sql.forget_inbox).bind(handler).execute(pool).await?.rows_affected())
    }

    async fn published_range(
        pool: &PgPool,
        sql: &Sql,
        from: i64,
        to: i64,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, OutboxError> {
        let rows =
            sqlx::query(&sql.select_range).bind(from).bind(to).bind(event_type).bind(limit).fetch_all(pool).await?;
        Ok(rows.iter().map(row).collect::<Result<Vec<_>, _>>()?)
    }

    async fn first_seq_since(
        pool: &PgPool,
        sql: &Sql,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<i64>, OutboxError> {
        Ok(sqlx::query_scalar(&sql.first_seq_since).bind(since).fetch_one(pool).await?)
    }

    async fn keep_dead_letter(pool: &PgPool, sql: &Sql, letter: &StoredDeadLetter) -> Result<(), OutboxError> {
        keep_dead_letter_row(pool, sql, letter).await
    }

    async fn dead_letters(pool: &PgPool, sql: &Sql, group: &str) -> Result<Vec<StoredDeadLetter>, OutboxError> {
        dead_letter_rows(pool, sql, group).await
    }

    async fn remove_dead_letter(pool: &PgPool, sql: &Sql, letter: &StoredDeadLetter) -> Result<bool, OutboxError> {
        remove_dead_letter_row(pool, sql, letter).await
    }

    async fn notify(pool: &PgPool, sql: &Sql) -> Result<(), OutboxError> {
        sqlx::query("SELECT pg_notify($1, $2)").bind(&sql.channel).bind(&sql.origin).execute(pool).await?;
        Ok(())
    }

    async fn listen(
        pool: &PgPool,
        sql: &Sql,
        wake: Arc<Notify>,
        listening: tokio::sync::watch::Sender<bool>,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let listener = async {
                let mut listener = PgListener::connect_with(pool).await?;
                listener.listen(&sql.channel).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = match listener.await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%error, ?backoff, "outbox LISTEN failed; relying on polling until it reconnects");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            tracing::debug!(channel = %sql.channel, "outbox LISTEN connected");
            listening.send_replace(true);
            backoff = Duration::from_millis(100);
            // Notifications sent while we were not listening are lost: look once.
            wake.notify_one();
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    received = listener.try_recv() => match received {
                        // This outbox's own commits woke its relays in-process already.
                        Ok(Some(notification)) if notification.payload() == sql.origin => {}
                        Ok(Some(notification)) => {
                            tracing::trace!(payload = notification.payload(), "outbox NOTIFY received");
                            wake.notify_one();
                        }
                        Ok(None) => {
                            tracing::warn!("outbox LISTEN connection lost; reconnecting");
                            wake.notify_one();
                        }
                        Err(error) => {
                            tracing::warn!(%error, "outbox LISTEN failed; reconnecting");
                            listening.send_replace(false);
                            wake.notify_one();
                            break;
                        }
                    },
                }
            }
        }
    }
}

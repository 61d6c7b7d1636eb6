//! [`DeadLetterTable`]: a consumer group's dead letters in the service's own database, for a bus whose queues do
//! not outlive its process (the in-process bus of the embedded demo). A dead letter stored here survives a crash
//! and a restart; `busctl dlq list` / `redrive` and [`DeadLetterQueue`](bus_core::DeadLetterQueue) read it.
//!
//! One row per (group, event id): dead-lettering the same event again replaces its row. Timestamps are stored as
//! Unix milliseconds on both databases.

use std::sync::Arc;

use async_trait::async_trait;
use bus_core::{
    BusError, DeadLetter, DeadLetterCause, DeadLetterStore, Envelope, EventTypeName, GroupName, TraceContext,
};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::backend::Backend;
use crate::error::OutboxError;
use crate::outbox::Outbox;

/// A consumer group's dead letters in the tables of an [`Outbox`] (its database, schema and prefix; created by
/// [`Outbox::migrate`]). Hand it to [`EventBus::keep_dead_letters`](bus_core::EventBus::keep_dead_letters).
pub struct DeadLetterTable<DB: Backend> {
    outbox: Outbox<DB>,
}

impl<DB: Backend> DeadLetterTable<DB> {
    /// The dead-letter table of `outbox`'s database.
    pub fn new(outbox: Outbox<DB>) -> Arc<Self> {
        Arc::new(Self { outbox })
    }
}

/// A dead letter as stored (plain column values, the same on both databases).
#[derive(Clone, Debug)]
#[doc(hidden)]
pub struct StoredDeadLetter {
    pub group_name: String,
    pub event_id: String,
    pub seq: Option<i64>,
    pub event_type: String,
    pub version: i64,
    pub occurred_at_ms: i64,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub partition_key: Option<String>,
    pub source: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub payload: Vec<u8>,
    pub last_error: String,
    pub cause: String,
    pub attempts: i64,
    pub failed_at_ms: i64,
}

impl StoredDeadLetter {
    fn of(letter: &DeadLetter) -> Result<Self, BusError> {
        let Some(envelope) = &letter.envelope else {
            return Err(BusError::InvalidEnvelope {
                field: "envelope",
                reason: "a dead-letter table keeps dead letters of events; this message is not one".into(),
            });
        };
        Ok(Self {
            group_name: letter.group.as_str().to_owned(),
            event_id: envelope.id().to_string(),
            seq: envelope.sequence(),
            event_type: envelope.event_type().as_str().to_owned(),
            version: i64::from(envelope.version()),
            occurred_at_ms: envelope.occurred_at().timestamp_millis(),
            correlation_id: envelope.correlation_id().to_owned(),
            causation_id: envelope.causation_id().map(|c| c.to_string()),
            partition_key: envelope.partition_key().map(str::to_owned),
            source: envelope.source().map(str::to_owned),
            traceparent: envelope.trace().traceparent().map(str::to_owned),
            tracestate: envelope.trace().tracestate().map(str::to_owned),
            payload: envelope.payload().to_vec(),
            last_error: letter.last_error.clone(),
            cause: letter.cause.as_str().to_owned(),
            attempts: i64::from(letter.attempts),
            failed_at_ms: letter.failed_at.timestamp_millis(),
        })
    }

    fn into_letter(self) -> Result<DeadLetter, String> {
        let uuid = |text: &str| Uuid::parse_str(text).map_err(|e| format!("bad id {text:?}: {e}"));
        let time = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).ok_or_else(|| format!("bad time {ms}"));
        let event_type = EventTypeName::new(&self.event_type).map_err(|e| e.to_string())?;
        let mut builder = Envelope::builder(event_type, self.payload)
            .id(uuid(&self.event_id)?)
            .version(u32::try_from(self.version).map_err(|_| format!("bad version {}", self.version))?)
            .occurred_at(time(self.occurred_at_ms)?)
            .correlation_id(self.correlation_id)
            .causation_id(self.causation_id.as_deref().map(uuid).transpose()?)
            .partition_key(self.partition_key)
            .sequence(self.seq)
            .trace(TraceContext::new(self.traceparent, self.tracestate).map_err(|e| e.to_string())?)
            .max_payload_bytes(usize::MAX);
        if let Some(source) = self.source {
            builder = builder.source(source);
        }
        let envelope = builder.build().map_err(|e| e.to_string())?;
        let group = GroupName::new(&self.group_name).map_err(|e| e.to_string())?;
        let mut letter = DeadLetter::of_event(
            envelope,
            group,
            self.last_error,
            DeadLetterCause::parse(&self.cause),
            u32::try_from(self.attempts).unwrap_or(u32::MAX),
        );
        letter.failed_at = time(self.failed_at_ms)?;
        Ok(letter)
    }
}

fn bus_error(error: OutboxError) -> BusError {
    BusError::Transport(Box::new(error))
}

#[async_trait]
impl<DB: Backend> DeadLetterStore for DeadLetterTable<DB> {
    async fn keep(&self, letter: &DeadLetter) -> Result<(), BusError> {
        let stored = StoredDeadLetter::of(letter)?;
        DB::keep_dead_letter(self.outbox.pool(), self.outbox.sql(), &stored).await.map_err(bus_error)
    }

    async fn list(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError> {
        let rows = DB::dead_letters(self.outbox.pool(), self.outbox.sql(), group.as_str()).await.map_err(bus_error)?;
        rows.into_iter()
            .map(|row| {
                let id = row.event_id.clone();
                row.into_letter().map_err(|reason| BusError::InvalidEnvelope {
                    field: "dead_letters",
                    reason: format!("stored dead letter {id} of group {group} is invalid: {reason}"),
                })
            })
            .collect()
    }

    async fn remove(&self, letter: &DeadLetter) -> Result<bool, BusError> {
        let stored = StoredDeadLetter::of(letter)?;
        DB::remove_dead_letter(self.outbox.pool(), self.outbox.sql(), &stored).await.map_err(bus_error)
    }
}

/// The dead-letter statements of a backend, the same on both databases (portable SQL, the same column types):
/// written once, expanded in each backend module as `keep_dead_letter_row`, `dead_letter_rows` and
/// `remove_dead_letter_row` over its pool and row types, which its `Backend` methods call.
macro_rules! dead_letter_statements {
    ($pool:ty, $row:ty) => {
        async fn keep_dead_letter_row(pool: &$pool, sql: &Sql, l: &StoredDeadLetter) -> Result<(), OutboxError> {
            sqlx::query(&sql.keep_dead_letter)
                .bind(&l.group_name)
                .bind(&l.event_id)
                .bind(l.seq)
                .bind(&l.event_type)
                .bind(l.version)
                .bind(l.occurred_at_ms)
                .bind(&l.correlation_id)
                .bind(&l.causation_id)
                .bind(&l.partition_key)
                .bind(&l.source)
                .bind(&l.traceparent)
                .bind(&l.tracestate)
                .bind(&l.payload)
                .bind(&l.last_error)
                .bind(&l.cause)
                .bind(l.attempts)
                .bind(l.failed_at_ms)
                .execute(pool)
                .await?;
            Ok(())
        }

        fn read_dead_letter(r: &$row) -> Result<StoredDeadLetter, sqlx::Error> {
            use sqlx::Row;
            Ok(StoredDeadLetter {
                group_name: r.try_get("group_name")?,
                event_id: r.try_get("event_id")?,
                seq: r.try_get("seq")?,
                event_type: r.try_get("event_type")?,
                version: r.try_get("version")?,
                occurred_at_ms: r.try_get("occurred_at_ms")?,
                correlation_id: r.try_get("correlation_id")?,
                causation_id: r.try_get("causation_id")?,
                partition_key: r.try_get("partition_key")?,
                source: r.try_get("source")?,
                traceparent: r.try_get("traceparent")?,
                tracestate: r.try_get("tracestate")?,
                payload: r.try_get("payload")?,
                last_error: r.try_get("last_error")?,
                cause: r.try_get("cause")?,
                attempts: r.try_get("attempts")?,
                failed_at_ms: r.try_get("failed_at_ms")?,
            })
        }

        async fn dead_letter_rows(pool: &$pool, sql: &Sql, group: &str) -> Result<Vec<StoredDeadLetter>, OutboxError> {
            let rows = sqlx::query(&sql.list_dead_letters).bind(group).fetch_all(pool).await?;
            rows.iter().map(|r| read_dead_letter(r).map_err(OutboxError::from)).collect()
        }

        async fn remove_dead_letter_row(pool: &$pool, sql: &Sql, l: &StoredDeadLetter) -> Result<bool, OutboxError> {
            let removed = sqlx::query(&sql.remove_dead_letter)
                .bind(&l.group_name)
                .bind(&l.event_id)
                .bind(l.failed_at_ms)
                .execute(pool)
                .await?;
            Ok(removed.rows_affected() > 0)
        }
    };
}
pub(crate) use dead_letter_statements;

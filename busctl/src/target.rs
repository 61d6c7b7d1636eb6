//! What busctl talks to: a service's outbox (PostgreSQL or SQLite, chosen by the URL) and the broker.

use anyhow::{Context, Result, anyhow};
use bus_core::{EventTypeName, GroupName};
use bus_rabbitmq::{RabbitBus, RabbitConfig};
use outbox::{Backend, DatabaseUrl, FailedEvent, Outbox, OutboxConfig, OutboxStatus};
use sqlx::{Pool, Postgres, Sqlite};

use crate::Global;

/// A service's outbox on either backend.
pub enum AnyOutbox {
    /// On PostgreSQL.
    Postgres(Outbox<Postgres>),
    /// On SQLite.
    Sqlite(Outbox<Sqlite>),
}

fn open<DB: Backend>(pool: Pool<DB>, global: &Global) -> Result<Outbox<DB>> {
    let mut config = OutboxConfig::new("busctl").table_prefix(&global.table_prefix);
    if let Some(schema) = &global.schema {
        config = config.schema(schema);
    }
    Ok(Outbox::new(pool, config)?)
}

impl AnyOutbox {
    /// Connects to `--database-url`.
    pub async fn connect(global: &Global) -> Result<Self> {
        let url =
            global.database_url.as_deref().ok_or_else(|| anyhow!("--database-url (or DATABASE_URL) is required"))?;
        let url = DatabaseUrl::parse(url).map_err(|reason| anyhow!("--database-url: {reason}"))?;
        let described = url.describe();
        let context = || format!("cannot connect to {described}");
        Ok(match url {
            DatabaseUrl::Postgres(options) => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .with_context(context)?;
                Self::Postgres(open(pool, global)?)
            }
            DatabaseUrl::Sqlite(options) => {
                // Never create a database that is not there: the URL is probably wrong.
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(options.create_if_missing(false))
                    .await
                    .with_context(context)?;
                Self::Sqlite(open(pool, global)?)
            }
        })
    }

    /// See [`Outbox::status`].
    pub async fn status(&self) -> Result<OutboxStatus> {
        Ok(match self {
            Self::Postgres(o) => o.status().await,
            Self::Sqlite(o) => o.status().await,
        }?)
    }

    /// See [`Outbox::failed`].
    pub async fn failed(&self, limit: i64) -> Result<Vec<FailedEvent>> {
        Ok(match self {
            Self::Postgres(o) => o.failed(limit).await,
            Self::Sqlite(o) => o.failed(limit).await,
        }?)
    }

    /// See [`Outbox::retry_failed`].
    pub async fn retry_failed(&self, id: Option<uuid::Uuid>) -> Result<u64> {
        Ok(match self {
            Self::Postgres(o) => o.retry_failed(id).await,
            Self::Sqlite(o) => o.retry_failed(id).await,
        }?)
    }

    /// See [`Outbox::forget_handled`].
    pub async fn forget_handled(&self, group: &GroupName, event_type: &EventTypeName) -> Result<u64> {
        Ok(match self {
            Self::Postgres(o) => o.forget_handled(group, event_type).await,
            Self::Sqlite(o) => o.forget_handled(group, event_type).await,
        }?)
    }

    /// See [`Outbox::seq_before`].
    pub async fn seq_before(&self, since: chrono::DateTime<chrono::Utc>) -> Result<Option<i64>> {
        Ok(match self {
            Self::Postgres(o) => o.seq_before(since).await,
            Self::Sqlite(o) => o.seq_before(since).await,
        }?)
    }

    /// See [`Outbox::published_events`].
    pub async fn published_events(
        &self,
        from: i64,
        to: i64,
        event_type: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(i64, bus_core::Envelope)>> {
        Ok(match self {
            Self::Postgres(o) => o.published_events(from, to, event_type, limit).await,
            Self::Sqlite(o) => o.published_events(from, to, event_type, limit).await,
        }?)
    }
}

/// Connects to `--amqp-url` (exchange `--exchange`).
pub async fn broker(global: &Global) -> Result<RabbitBus> {
    let url = global.amqp_url.as_deref().ok_or_else(|| anyhow!("--amqp-url (or AMQP_URL) is required"))?;
    let mut config = RabbitConfig::new(url).map_err(|e| anyhow!("--amqp-url: {e}"))?;
    config.exchange = global.exchange.clone();
    let redacted = config.url.to_string();
    RabbitBus::connect(config).await.with_context(|| format!("cannot connect to the broker at {redacted}"))
}

/// A consumer group name from `--queue`.
pub fn group(queue: &str) -> Result<GroupName> {
    GroupName::new(queue).map_err(|e| anyhow!("--queue: {e}"))
}

//! The benchmark's PostgreSQL: `BENCH_DATABASE_URL`, else `DATABASE_URL`, else the local default. Each scenario
//! works in a fresh schema, dropped afterwards.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A schema for one scenario run, with a pool whose connections use it by default.
pub struct Scratch {
    pub pool: PgPool,
    pub schema: String,
}

impl Scratch {
    pub async fn new(connections: u32) -> anyhow::Result<Self> {
        let url = std::env::var("BENCH_DATABASE_URL")
            .or_else(|_| std::env::var("DATABASE_URL"))
            .unwrap_or_else(|_| DEFAULT_URL.to_owned());
        let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .context("cannot reach PostgreSQL (set BENCH_DATABASE_URL)")?;
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(&admin).await?;
        admin.close().await;
        let search_path = schema.clone();
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _| {
                let set = format!("SET search_path TO \"{search_path}\"");
                Box::pin(async move {
                    sqlx::query(&set).execute(conn).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        Ok(Self { pool, schema })
    }

    pub async fn drop_schema(self) -> anyhow::Result<()> {
        sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema)).execute(&self.pool).await?;
        self.pool.close().await;
        Ok(())
    }
}

/// The business row the consumer scenarios write per handled event, into their `handled` table.
pub async fn insert_handled(conn: &mut sqlx::PgConnection, event_id: uuid::Uuid, seq: u64) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO handled (event_id, seq) VALUES ($1, $2)")
        .bind(event_id)
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
    Ok(())
}

/// A scratch schema with the `handled` table and an inbox (outbox crate's tables, service `bench`): the setup of
/// the consumer scenarios.
pub async fn inbox_scratch(connections: u32) -> anyhow::Result<(Scratch, outbox::Inbox<sqlx::Postgres>)> {
    let scratch = Scratch::new(connections).await?;
    sqlx::query("CREATE TABLE handled (event_id UUID PRIMARY KEY, seq BIGINT NOT NULL)").execute(&scratch.pool).await?;
    let outbox =
        outbox::Outbox::new(scratch.pool.clone(), outbox::OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let inbox = outbox::Inbox::new(outbox, outbox::InboxConfig::default(), &bus_core::RetryPolicy::default())?;
    Ok((scratch, inbox))
}

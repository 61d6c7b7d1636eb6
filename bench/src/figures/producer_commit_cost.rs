//! `producer_commit_cost`: commits/s of a business transaction that also enqueues one event through the
//! framework (wake-up included: the coalesced NOTIFY after commit), against the same business transaction
//! inserting the same outbox row with raw SQL into an identical table, 8 writers, same run.
//!
//! Both variants write the business row (an order with a 1 KiB document) and one 1 KiB event row; the baseline's
//! outbox table is created by the same migration, so indexes are identical. No relay runs during the measurement
//! (it would compete for the same database in one variant only).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bus_core::{Envelope, EventTypeName};
use outbox::{Outbox, OutboxConfig};
use sqlx::PgPool;

use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, payload};
use crate::report::{Figure, median};

const WRITERS: usize = 8;

async fn business_row(conn: &mut sqlx::PgConnection, doc: &[u8]) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO orders (customer, total_cents, document) VALUES ($1, $2, $3)")
        .bind("bench")
        .bind(1234_i64)
        .bind(doc)
        .execute(conn)
        .await?;
    Ok(())
}

async fn run_writers<F, Fut>(duration: Duration, write: F) -> anyhow::Result<f64>
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (stop, commits, write) = (stop.clone(), commits.clone(), write.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                write().await?;
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let counted = commits.load(Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(counted as f64 / elapsed)
}

async fn ours(pool: &PgPool, outbox: &Outbox<sqlx::Postgres>, duration: Duration) -> anyhow::Result<f64> {
    let (pool, outbox, doc) = (pool.clone(), outbox.clone(), Arc::new(payload(0)));
    let event_type = EventTypeName::new(EVENT_TYPE)?;
    run_writers(duration, move || {
        let (pool, outbox, doc, event_type) = (pool.clone(), outbox.clone(), doc.clone(), event_type.clone());
        async move {
            let mut tx = pool.begin().await?;
            business_row(&mut tx, &doc).await?;
            let event = Envelope::builder(event_type, doc.to_vec()).partition_key(Some("order-1".into()));
            outbox.enqueue_with(&mut tx, event).await?;
            tx.commit().await?;
            outbox.committed();
            Ok(())
        }
    })
    .await
}

async fn baseline(pool: &PgPool, duration: Duration) -> anyhow::Result<f64> {
    let (pool, doc) = (pool.clone(), Arc::new(payload(0)));
    run_writers(duration, move || {
        let (pool, doc) = (pool.clone(), doc.clone());
        async move {
            let mut tx = pool.begin().await?;
            business_row(&mut tx, &doc).await?;
            sqlx::query(
                "INSERT INTO raw_outbox (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                 partition_key, source, traceparent, tracestate, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(uuid::Uuid::now_v7())
            .bind(EVENT_TYPE)
            .bind(1_i32)
            .bind(chrono_now())
            .bind("bench")
            .bind(None::<uuid::Uuid>)
            .bind(Some("order-1"))
            .bind(Some("bench"))
            .bind(None::<String>)
            .bind(None::<String>)
            .bind(&doc[..])
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await
}

fn chrono_now() -> sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc> {
    sqlx::types::chrono::Utc::now()
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let duration = if quick { Duration::from_secs(2) } else { Duration::from_secs(6) };
    let scratch = Scratch::new(WRITERS as u32 + 2).await?;
    sqlx::query("CREATE TABLE orders (id BIGSERIAL PRIMARY KEY, customer TEXT NOT NULL, total_cents BIGINT NOT NULL, document BYTEA NOT NULL)")
        .execute(&scratch.pool)
        .await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    // The baseline's table: the same migration under another prefix, so the DDL and indexes are identical.
    let raw = Outbox::new(
        scratch.pool.clone(),
        OutboxConfig::new("bench").schema(scratch.schema.clone()).table_prefix("raw_"),
    )?;
    raw.migrate().await?;
    let (mut ours_runs, mut base_runs) = (Vec::new(), Vec::new());
    for run in 1..=3 {
        let b = baseline(&scratch.pool, duration).await?;
        let o = ours(&scratch.pool, &outbox, duration).await?;
        eprintln!(
            "producer_commit_cost run {run}: framework {o:>7.0} commits/s   raw SQL {b:>7.0} commits/s ({WRITERS} writers)"
        );
        ours_runs.push(o);
        base_runs.push(b);
    }
    scratch.drop_schema().await?;
    Ok(vec![Figure::ratio("producer_commit_cost", "commits/s", median(ours_runs), median(base_runs), 0.9)])
}

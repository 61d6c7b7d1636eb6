//! `relay_takeover_ms`: how long the events of a relay that died stay waiting. A child process runs a relay
//! whose bus never confirms, so that it holds 1,000 leased rows (two batches; a 30 s lease); the benchmark
//! SIGKILLs it and measures the time until the relay of this process, idle and running all along as a
//! surviving instance would be, has published every one of them. No baseline: the bound is DESIGN.md's
//! "a dead relay's rows are taken over in about a second" (≤ 2,000 ms).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{BusError, Confirmation, Envelope, EventBus, GroupName, Subscription, SubscriptionHandle};
use bus_inproc::InProcBus;
use outbox::{Outbox, OutboxConfig, RelayConfig};

use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, envelopes};
use crate::report::{Figure, median};

/// The argument that makes the benchmark binary run as the doomed relay process.
pub const CHILD: &str = "__takeover_child";

/// Rows the doomed relay holds: its two batches of the default 500 (each event has a key of its own: a relay
/// holds a key's later rows back until the earlier one is confirmed, so with fewer keys it would hold fewer).
const HELD: u64 = 1_000;

/// A bus that takes every publish and never confirms it: the relay holds its rows until it dies.
struct NeverConfirms;

#[async_trait]
impl EventBus for NeverConfirms {
    async fn publish(&self, _envelope: Envelope) -> Result<Confirmation, BusError> {
        Ok(Confirmation::from_future(std::future::pending()))
    }

    async fn subscribe(&self, _subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        Err(BusError::Closed)
    }

    async fn health(&self) -> Result<(), BusError> {
        Ok(())
    }
}

fn url() -> String {
    std::env::var("BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// In the child: relay `schema`'s outbox to a bus that never confirms, until killed.
pub async fn child(schema: &str) -> anyhow::Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&url()).await?;
    let outbox = Outbox::new(pool, OutboxConfig::new("bench").schema(schema))?;
    let _relay = outbox.relay(Arc::new(NeverConfirms), RelayConfig::default())?.spawn();
    std::future::pending::<()>().await;
    Ok(())
}

async fn once(scratch: &Scratch, outbox: &Outbox<sqlx::Postgres>, bus: &InProcBus) -> anyhow::Result<f64> {
    let all = envelopes(HELD, HELD)?;
    let mut tx = outbox.pool().begin().await?;
    outbox.enqueue_envelopes(&mut tx, &all).await?;
    tx.commit().await?;
    let mut doomed = tokio::process::Command::new(std::env::current_exe()?)
        .args([CHILD, &scratch.schema])
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outbox.status().await?.in_flight < HELD as i64 {
        anyhow::ensure!(Instant::now() < deadline, "the doomed relay never held all {HELD} rows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The survivor: idle (nothing is free to claim), polling as a relay does (1 s), no wake-up coming.
    let survivor = outbox.relay(Arc::new(bus.clone()), RelayConfig::default())?.spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    anyhow::ensure!(survivor.stats().published == 0, "the survivor took rows the doomed relay held");
    doomed.start_kill()?;
    let killed = Instant::now();
    doomed.wait().await?;
    while survivor.stats().published < HELD {
        anyhow::ensure!(killed.elapsed() < Duration::from_secs(120), "the survivor never published the rows");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let ms = killed.elapsed().as_secs_f64() * 1e3;
    survivor.shutdown().await;
    sqlx::query("TRUNCATE bus_outbox").execute(&scratch.pool).await?;
    Ok(ms)
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let scratch = Scratch::new(4).await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let bus = InProcBus::new();
    let _consumer = bus
        .subscribe(
            Subscription::new(GroupName::from_static("bench"))
                .on_envelope(EVENT_TYPE, Arc::new(crate::figures::Discard)),
        )
        .await?;
    let mut samples = Vec::new();
    for run in 1..=if quick { 2 } else { 5 } {
        let ms = once(&scratch, &outbox, &bus).await?;
        eprintln!("relay_takeover run {run}: {HELD} rows of a SIGKILLed relay published by another in {ms:.0} ms");
        samples.push(ms);
    }
    bus.shutdown(Duration::from_secs(5)).await;
    scratch.drop_schema().await?;
    Ok(vec![Figure::bound("relay_takeover_ms", "ms", median(samples), 2_000.0)])
}

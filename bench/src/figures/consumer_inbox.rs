//! `consumer_inbox`: events/s handled when each handling is a database transaction that goes through the inbox
//! (inbox row + business row, one commit) against the same transaction without the inbox row, same run.
//!
//! Events are handed straight to bus-inproc (no relay); 8 handlers at once; the clock stops when all are handled.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, EventBus, GroupName, HandlerError, Subscription};
use bus_inproc::{ConfirmOn, InProcBus, InProcConfig};
use outbox::{InboxTransaction, SubscriptionInboxExt};
use sqlx::PgPool;

use crate::database::{inbox_scratch, insert_handled};
use crate::payload::{BenchEvent, EVENT_TYPE, envelopes};
use crate::report::{Figure, median};

const CONCURRENCY: usize = 8;

/// The baseline handler: the same transaction, no inbox row.
struct PlainTx(PgPool);

#[async_trait]
impl EnvelopeHandler for PlainTx {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let event: BenchEvent = ctx.envelope().decode().map_err(HandlerError::permanent)?;
        let mut tx = self.0.begin().await.map_err(HandlerError::transient)?;
        insert_handled(&mut tx, ctx.event_id(), event.seq).await.map_err(HandlerError::transient)?;
        tx.commit().await.map_err(HandlerError::transient)
    }
}

async fn drive(subscription: Subscription, bus: &InProcBus, count: u64) -> anyhow::Result<f64> {
    let events = envelopes(count, 0)?;
    let handle = bus.subscribe(subscription).await?;
    let start = Instant::now();
    for envelope in events {
        drop(bus.publish(envelope).await?);
    }
    bus.settled().await;
    let elapsed = start.elapsed().as_secs_f64();
    handle.shutdown().await;
    anyhow::ensure!(bus.stats().dead_lettered == 0, "handlings failed: {:?}", bus.stats());
    Ok(count as f64 / elapsed)
}

fn bus() -> anyhow::Result<InProcBus> {
    Ok(InProcBus::with_config(InProcConfig {
        confirm_on: ConfirmOn::Enqueued,
        concurrency: CONCURRENCY,
        ..InProcConfig::default()
    })?)
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 2_000 } else { 10_000 };
    let (scratch, inbox) = inbox_scratch(CONCURRENCY as u32 + 2).await?;
    let (mut ours_runs, mut base_runs) = (Vec::new(), Vec::new());
    for run in 1..=3 {
        sqlx::query("TRUNCATE handled").execute(&scratch.pool).await?;
        let plain = Subscription::new(GroupName::from_static("bench"))
            .on_envelope(EVENT_TYPE, Arc::new(PlainTx(scratch.pool.clone())));
        let b = drive(plain, &bus()?, count).await?;
        sqlx::query("TRUNCATE handled").execute(&scratch.pool).await?;
        let with_inbox = Subscription::new(GroupName::from_static("bench")).on_inbox(
            &inbox,
            |event: BenchEvent, mut tx: InboxTransaction<sqlx::Postgres>| async move {
                let event_id = tx.delivery().event_id();
                insert_handled(&mut tx, event_id, event.seq).await.map_err(HandlerError::transient)
            },
        );
        let o = drive(with_inbox, &bus()?, count).await?;
        eprintln!("consumer_inbox run {run}: with inbox {o:>7.0} events/s   without {b:>7.0} events/s");
        ours_runs.push(o);
        base_runs.push(b);
    }
    scratch.drop_schema().await?;
    Ok(vec![Figure::ratio("consumer_inbox", "events/s", median(ours_runs), median(base_runs), 0.7)])
}

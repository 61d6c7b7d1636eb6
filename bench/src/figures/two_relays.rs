//! `two_relays` and `two_relays_duplicates`: drain rate of a backlog of pending events (100 partition keys) by
//! two relays sharing one outbox (separate pools, as two processes), against one relay, to bus-inproc with a
//! trivial consumer; and how many events the two published twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, EventBus, GroupName, HandlerError, Subscription};
use bus_inproc::InProcBus;
use outbox::{Outbox, OutboxConfig, RelayConfig};

use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, envelopes};
use crate::report::{Figure, median};

struct Seen(Arc<Mutex<(u64, HashSet<uuid::Uuid>)>>);

#[async_trait]
impl EnvelopeHandler for Seen {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.0 += 1;
        seen.1.insert(ctx.event_id());
        Ok(())
    }
}

async fn backlog(outbox: &Outbox<sqlx::Postgres>, count: u64) -> anyhow::Result<()> {
    let all = envelopes(count, 100)?;
    for chunk in all.chunks(500) {
        let mut tx = outbox.pool().begin().await?;
        outbox.enqueue_envelopes(&mut tx, chunk).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Drains `count` pending events with `relays` relays; returns (events/s, duplicates).
async fn drain(scratch: &Scratch, relays: usize, count: u64) -> anyhow::Result<(f64, u64)> {
    let config = OutboxConfig::new("bench").schema(scratch.schema.clone());
    let producer = Outbox::new(scratch.pool.clone(), config.clone())?;
    backlog(&producer, count).await?;
    let bus = InProcBus::new();
    let seen = Arc::new(Mutex::new((0, HashSet::new())));
    let _consumer = bus
        .subscribe(
            Subscription::new(GroupName::from_static("bench")).on_envelope(EVENT_TYPE, Arc::new(Seen(seen.clone()))),
        )
        .await?;
    let mut outboxes = vec![producer];
    for _ in 1..relays {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(scratch.pool.connect_options().as_ref().clone())
            .await?;
        outboxes.push(Outbox::new(pool, config.clone())?);
    }
    let start = Instant::now();
    let handles: Vec<_> = outboxes
        .iter()
        .map(|o| o.relay(Arc::new(bus.clone()), RelayConfig::default()).map(|r| r.spawn()))
        .collect::<Result<_, _>>()?;
    loop {
        let unique = seen.lock().unwrap_or_else(|p| p.into_inner()).1.len() as u64;
        if unique >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    for handle in handles {
        handle.shutdown().await;
    }
    bus.settled().await;
    let (deliveries, unique) = {
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        (seen.0, seen.1.len() as u64)
    };
    bus.shutdown(Duration::from_secs(5)).await;
    sqlx::query("TRUNCATE bus_outbox").execute(&scratch.pool).await?;
    Ok((count as f64 / elapsed, deliveries - unique))
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 5_000 } else { 20_000 };
    let scratch = Scratch::new(6).await?;
    Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?.migrate().await?;
    let (mut one, mut two, mut duplicates) = (Vec::new(), Vec::new(), 0);
    for run in 1..=3 {
        let (rate1, dup1) = drain(&scratch, 1, count).await?;
        let (rate2, dup2) = drain(&scratch, 2, count).await?;
        eprintln!(
            "two_relays run {run}: two relays {rate2:>7.0} events/s   one relay {rate1:>7.0} events/s   duplicates {dup2} (one relay: {dup1})"
        );
        one.push(rate1);
        two.push(rate2);
        duplicates += dup2;
    }
    scratch.drop_schema().await?;
    Ok(vec![
        Figure::ratio("two_relays", "events/s", median(two), median(one), 0.95),
        Figure::bound("two_relays_duplicates", "events", duplicates as f64, 0.0),
    ])
}

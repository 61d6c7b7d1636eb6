//! `e2e_latency_p50_ms` / `e2e_latency_p99_ms`: from the producer's commit to the consumer's handler, at 1,000
//! events/s: one event per transaction (PostgreSQL), the relay in the producer's process (woken at once), RabbitMQ
//! with confirms, a consumer group with a trivial handler.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{
    DeliveryContext, Envelope, EnvelopeHandler, EventBus, EventTypeName, GroupName, HandlerError, Subscription,
};
use outbox::{Outbox, OutboxConfig, RelayConfig};

use crate::broker::Sink;
use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, payload};
use crate::report::Figure;

type Committed = Arc<Mutex<HashMap<uuid::Uuid, Instant>>>;

struct Measure {
    committed: Committed,
    latencies: Arc<Mutex<Vec<Duration>>>,
}

#[async_trait]
impl EnvelopeHandler for Measure {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let now = Instant::now();
        let committed = self.committed.lock().unwrap_or_else(|p| p.into_inner()).remove(&ctx.event_id());
        if let Some(at) = committed {
            self.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now - at);
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let seconds = if quick { 3 } else { 10 };
    let rate = 1000u64;
    let scratch = Scratch::new(8).await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let sink = Sink::new().await?;
    let bus = sink.bus().await?;
    let committed: Committed = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let group = format!("bench-e2e-{}", uuid::Uuid::new_v4().simple());
    let consumer = bus
        .subscribe(
            Subscription::new(GroupName::new(&group)?).on_envelope(
                EVENT_TYPE,
                Arc::new(Measure { committed: committed.clone(), latencies: latencies.clone() }),
            ),
        )
        .await?;
    let relay = outbox.relay(Arc::new(bus.clone()), RelayConfig::default())?.spawn();
    let event_type = EventTypeName::new(EVENT_TYPE)?;
    let total = rate * seconds;
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for seq in 0..total {
        ticker.tick().await;
        let (outbox, committed, event_type) = (outbox.clone(), committed.clone(), event_type.clone());
        producers.spawn(async move {
            let builder = Envelope::builder(event_type, payload(seq)).partition_key(Some(format!("k{}", seq % 100)));
            let mut tx = outbox.pool().begin().await?;
            let id = outbox.enqueue_with(&mut tx, builder).await?;
            tx.commit().await?;
            committed.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
            outbox.committed();
            Ok::<_, anyhow::Error>(())
        });
        while let Some(done) = producers.try_join_next() {
            done??;
        }
    }
    while let Some(done) = producers.join_next().await {
        done??;
    }
    let offered = total as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut samples = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    samples.sort_unstable();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    eprintln!(
        "e2e_latency: {} of {total} events measured at {offered:.0} events/s offered: p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        samples.len(),
        samples.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    );
    relay.shutdown().await;
    consumer.shutdown().await;
    bus.shutdown().await;
    let channel = sink.channel.clone();
    for queue in [group.clone(), format!("{group}.retry"), format!("{group}.dlq")] {
        let _ = channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    sink.delete().await?;
    scratch.drop_schema().await?;
    Ok(vec![Figure::bound("e2e_latency_p50_ms", "ms", p50, 3.0), Figure::bound("e2e_latency_p99_ms", "ms", p99, 15.0)])
}

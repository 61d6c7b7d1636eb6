//! `inproc_dispatch`: events/s through bus-inproc with a trivial handler, against a bare tokio mpsc carrying the
//! same envelopes to a consumer task doing the same trivial work, in the same run.
//!
//! Ours is measured as a relay uses it: default configuration (confirm on handled, bounded queue), one consumer
//! group, batches of 256 with up to 1,024 confirmations in flight; the clock stops when the last confirmation
//! resolved. The harness runs on mimalloc, as we recommend for services: glibc's malloc serializes a
//! producer/consumer pattern across threads (frees on the consumer thread refill the producer's arena under
//! its lock), which costs the bus about a third of its throughput and the bare channel nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, EventBus, GroupName, HandlerError, Subscription};
use bus_inproc::InProcBus;

use crate::payload::{EVENT_TYPE, envelopes};
use crate::report::{Figure, median};

const IN_FLIGHT: usize = 1024;
const BATCH: usize = 256;

struct Count(Arc<AtomicU64>);

#[async_trait]
impl EnvelopeHandler for Count {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        self.0.fetch_add(ctx.envelope().payload().len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

async fn ours(count: u64) -> anyhow::Result<f64> {
    let events = envelopes(count, 0)?;
    let bus = InProcBus::new();
    let counter = Arc::new(AtomicU64::new(0));
    let _sub = bus
        .subscribe(
            Subscription::new(GroupName::from_static("bench"))
                .on_envelope(EVENT_TYPE, Arc::new(Count(counter.clone()))),
        )
        .await?;
    let start = Instant::now();
    let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        while in_flight.len() + BATCH > IN_FLIGHT {
            if let Some(confirmation) = in_flight.pop_front() {
                confirmation.await?;
            }
        }
        in_flight.extend(bus.publish_batch(events.by_ref().take(BATCH).collect()).await);
    }
    for confirmation in in_flight {
        confirmation.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(counter.load(Ordering::Relaxed) == count * 1024, "not every event was handled");
    bus.shutdown(std::time::Duration::from_secs(5)).await;
    Ok(count as f64 / elapsed)
}

async fn baseline(count: u64) -> anyhow::Result<f64> {
    let events = envelopes(count, 0)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(bus_inproc::InProcConfig::default().queue_capacity);
    let counter = Arc::new(AtomicU64::new(0));
    let c = counter.clone();
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        while let Some(envelope) = rx.recv().await {
            let envelope: bus_core::Envelope = envelope;
            c.fetch_add(envelope.payload().len() as u64, Ordering::Relaxed);
        }
    });
    for envelope in events {
        tx.send(envelope).await?;
    }
    drop(tx);
    consumer.await?;
    let elapsed = start.elapsed().as_secs_f64();
    anyhow::ensure!(counter.load(Ordering::Relaxed) == count * 1024, "not every event was received");
    Ok(count as f64 / elapsed)
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 20_000 } else { 200_000 };
    let (mut ours_runs, mut base_runs) = (Vec::new(), Vec::new());
    for run in 1..=3 {
        let b = baseline(count).await?;
        let o = ours(count).await?;
        eprintln!("inproc_dispatch run {run}: bus-inproc {o:>10.0} events/s   tokio mpsc {b:>10.0} events/s");
        ours_runs.push(o);
        base_runs.push(b);
    }
    Ok(vec![Figure::ratio("inproc_dispatch", "events/s", median(ours_runs), median(base_runs), 0.5)])
}

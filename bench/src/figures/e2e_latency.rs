//! End-to-end latency, from the producer's commit to the consumer's handler, against the floor of this machine
//! measured in the same run.
//!
//! - `e2e_latency_p50_ms` / `e2e_latency_p99_ms` at 1,000 events/s: one event per transaction (PostgreSQL; a
//!   business row and the event, through [`Outbox::begin`], so the relay in the producer's process takes it
//!   directly), RabbitMQ with confirms, a consumer group with a trivial handler. Baseline: the floor at the same
//!   rate; `ratio` = value / floor; targets 1.5× (p50) and 2× (p99).
//! - `e2e_floor_p50_ms` / `e2e_floor_p99_ms`: the same transaction (a business row and a 1 KiB row), then the same
//!   payload published with raw lapin, its confirm awaited, received by a raw lapin consumer. A reference: its
//!   `target` is itself.
//! - `e2e_latency_200_p50_ms` / `e2e_latency_200_p99_ms` (and `e2e_floor_200_*`): the same at 200 events/s, the
//!   rate of the published Rust relay peer; their `target` is the peer's figure on this machine (3.3 / 16.7 ms).
//!
//! The clock starts just before the commit, on both sides, and every event sent must arrive (a missing one is
//! an error, not a sample left out).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{
    DeliveryContext, Envelope, EnvelopeHandler, EventBus, EventTypeName, GroupName, HandlerError, Subscription,
};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use outbox::{Outbox, OutboxConfig, RelayConfig};
use sqlx::PgPool;

use crate::broker::Sink;
use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, payload};
use crate::report::Figure;

/// Event id → when its transaction began to commit.
type Started = Arc<Mutex<HashMap<uuid::Uuid, Instant>>>;

/// Latencies of one run.
#[derive(Default)]
struct Samples {
    started: Started,
    latencies: Mutex<Vec<Duration>>,
    unknown: Mutex<u64>,
}

impl Samples {
    fn arrived(&self, id: uuid::Uuid) {
        let now = Instant::now();
        match self.started.lock().unwrap_or_else(|p| p.into_inner()).remove(&id) {
            Some(at) => self.latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now - at),
            // A duplicate (redelivery) or an event of no run: counted, never a sample.
            None => *self.unknown.lock().unwrap_or_else(|p| p.into_inner()) += 1,
        }
    }

    fn count(&self) -> usize {
        self.latencies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Waits for every event sent, then gives (p50, p99, max) in ms.
    async fn summary(&self, what: &str, total: u64, offered: f64) -> anyhow::Result<(f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < total as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut samples = self.latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        anyhow::ensure!(
            samples.len() == total as usize,
            "{what}: {} of {total} events arrived within 60 s",
            samples.len()
        );
        samples.sort_unstable();
        let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
        let max = samples.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        let unknown = *self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        eprintln!(
            "{what}: all {total} events at {offered:.0} events/s offered: p50 {p50:.2} ms, p99 {p99:.2} ms, max \
             {max:.2} ms ({unknown} deliveries of no sample)"
        );
        Ok((p50, p99))
    }
}

struct Measure(Arc<Samples>);

#[async_trait]
impl EnvelopeHandler for Measure {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        self.0.arrived(ctx.event_id());
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

/// Offers `total` transactions at `rate` per second, each run by `produce` in a task of its own; returns the
/// rate offered.
async fn offer<F, Fut>(rate: u64, total: u64, produce: F) -> anyhow::Result<f64>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut producers = tokio::task::JoinSet::new();
    for seq in 0..total {
        ticker.tick().await;
        producers.spawn(produce(seq));
        while let Some(done) = producers.try_join_next() {
            done??;
        }
    }
    while let Some(done) = producers.join_next().await {
        done??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The business change both sides make in their transaction.
async fn business_row(conn: &mut sqlx::PgConnection, seq: u64) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO orders (seq) VALUES ($1)")
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .execute(conn)
        .await?;
    Ok(())
}

async fn tables(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("CREATE TABLE orders (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, seq BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    sqlx::query("CREATE TABLE floor_events (id UUID PRIMARY KEY, payload BYTEA NOT NULL)").execute(pool).await?;
    Ok(())
}

/// The framework: outbox, relay (direct dispatch), RabbitMQ bus, consumer group.
async fn framework(scratch: &Scratch, rate: u64, total: u64) -> anyhow::Result<(f64, f64)> {
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let sink = Sink::new().await?;
    let bus = sink.bus().await?;
    let samples = Arc::new(Samples::default());
    let group = format!("bench-e2e-{}", uuid::Uuid::new_v4().simple());
    let consumer = bus
        .subscribe(
            Subscription::new(GroupName::new(&group)?).on_envelope(EVENT_TYPE, Arc::new(Measure(samples.clone()))),
        )
        .await?;
    let relay = outbox.relay(Arc::new(bus.clone()), RelayConfig::default())?.spawn();
    let event_type = EventTypeName::new(EVENT_TYPE)?;
    // Let the relay take its liveness proof (and offer itself for direct dispatch) before the clock runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The hop breakdown (BENCH_HOPS=1): when each commit began and when it returned.
    let (began, committed): (Started, Started) = Default::default();
    let offered = offer(rate, total, |seq| {
        let (outbox, started, event_type) = (outbox.clone(), samples.started.clone(), event_type.clone());
        let (began, committed) = (began.clone(), committed.clone());
        async move {
            let builder = Envelope::builder(event_type, payload(seq)).partition_key(Some(format!("k{}", seq % 100)));
            let mut tx = outbox.begin().await?;
            business_row(&mut tx, seq).await?;
            let id = tx.enqueue_with(builder).await?;
            // Before the commit: the relay may publish the event as soon as it commits.
            let now = Instant::now();
            started.lock().unwrap_or_else(|p| p.into_inner()).insert(id, now);
            if crate::hops::enabled() {
                began.lock().unwrap_or_else(|p| p.into_inner()).insert(id, now);
            }
            tx.commit().await?;
            if crate::hops::enabled() {
                committed.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
            }
            Ok(())
        }
    })
    .await?;
    let result = samples.summary(&format!("e2e_latency at {rate}/s"), total, offered).await;
    if crate::hops::enabled() {
        hop_breakdown(&began, &committed);
    }
    eprintln!("  relay: {:?}", relay.stats());
    relay.shutdown().await;
    consumer.shutdown().await;
    bus.shutdown().await;
    for queue in [group.clone(), format!("{group}.retry"), format!("{group}.dlq"), format!("{group}.bindings")] {
        let _ = sink.channel.queue_delete(queue.as_str().into(), Default::default()).await;
    }
    sink.delete().await?;
    result
}

/// Prints where the time of the events went (`BENCH_HOPS=1`): the producer's commit, commit → the relay's send,
/// send → the consumer's handler, send → the broker's confirmation (percentiles over every event seen at both
/// ends of a hop).
fn hop_breakdown(began: &Started, committed: &Started) {
    let began = began.lock().unwrap_or_else(|p| p.into_inner());
    let committed = committed.lock().unwrap_or_else(|p| p.into_inner());
    let hops = crate::hops::take();
    let (mut commit, mut handoff, mut to_consumer, mut confirm) = (vec![], vec![], vec![], vec![]);
    for (id, hop) in &hops {
        let (start, done) = (began.get(id), committed.get(id));
        if let (Some(start), Some(done)) = (start, done) {
            commit.push(*done - *start);
            if let Some(sent) = hop.sent {
                handoff.push(sent.saturating_duration_since(*done));
            }
        }
        if let (Some(sent), Some(consumed)) = (hop.sent, hop.consumed) {
            to_consumer.push(consumed.saturating_duration_since(sent));
        }
        if let (Some(sent), Some(confirmed)) = (hop.sent, hop.confirmed) {
            confirm.push(confirmed.saturating_duration_since(sent));
        }
    }
    for (name, mut values) in [
        ("commit (producer's COMMIT)", commit),
        ("commit done -> relay send", handoff),
        ("relay send -> consumer handler", to_consumer),
        ("relay send -> confirmation", confirm),
    ] {
        values.sort_unstable();
        eprintln!(
            "  hop {name:<32} p50 {:>6.2} ms  p99 {:>6.2} ms  ({} events)",
            percentile(&values, 0.5),
            percentile(&values, 0.99),
            values.len()
        );
    }
}

/// The floor: the same transaction, then raw lapin publish + confirm, to a raw lapin consumer.
async fn floor(scratch: &Scratch, rate: u64, total: u64) -> anyhow::Result<(f64, f64)> {
    let sink = Sink::new().await?;
    let connection = lapin::Connection::connect(&crate::broker::url(), lapin::ConnectionProperties::default()).await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    let receiver = connection.create_channel().await?;
    let mut deliveries = receiver
        .basic_consume(
            sink.queue.as_str().into(),
            "e2e-floor".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let samples = Arc::new(Samples::default());
    let consumer = {
        let samples = samples.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = deliveries.next().await {
                let id = delivery.properties.message_id().as_ref().and_then(|id| id.as_str().parse().ok());
                if let Some(id) = id {
                    samples.arrived(id);
                }
            }
        })
    };
    let exchange = sink.exchange.clone();
    let offered = offer(rate, total, |seq| {
        let (pool, started, publisher, exchange) =
            (scratch.pool.clone(), samples.started.clone(), publisher.clone(), exchange.clone());
        async move {
            let id = uuid::Uuid::now_v7();
            let body = payload(seq);
            let mut tx = pool.begin().await?;
            business_row(&mut tx, seq).await?;
            sqlx::query("INSERT INTO floor_events (id, payload) VALUES ($1, $2)")
                .bind(id)
                .bind(&body)
                .execute(&mut *tx)
                .await?;
            started.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Instant::now());
            tx.commit().await?;
            let properties = BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_type(EVENT_TYPE.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let options = BasicPublishOptions { mandatory: true, ..Default::default() };
            let confirm = publisher
                .basic_publish(exchange.as_str().into(), EVENT_TYPE.into(), options, &body, properties)
                .await?;
            anyhow::ensure!(confirm.await?.is_ack(), "nack");
            Ok(())
        }
    })
    .await?;
    let result = samples.summary(&format!("e2e_floor at {rate}/s"), total, offered).await;
    consumer.abort();
    let _ = connection.close(200, "done".into()).await;
    sink.delete().await?;
    result
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let seconds = if quick { 3 } else { 10 };
    let mut figures = Vec::new();
    for rate in [1000u64, 200] {
        let total = rate * seconds;
        let scratch = Scratch::new(8).await?;
        tables(&scratch.pool).await?;
        let (floor_p50, floor_p99) = floor(&scratch, rate, total).await?;
        let (p50, p99) = framework(&scratch, rate, total).await?;
        scratch.drop_schema().await?;
        eprintln!(
            "e2e at {rate}/s: p50 {p50:.2} ms = {:.2}× the floor ({floor_p50:.2} ms), p99 {p99:.2} ms = {:.2}× ({floor_p99:.2} ms)",
            p50 / floor_p50,
            p99 / floor_p99
        );
        if rate == 1000 {
            figures.extend([
                Figure::latency("e2e_latency_p50_ms", p50, floor_p50, 1.5),
                Figure::latency("e2e_latency_p99_ms", p99, floor_p99, 2.0),
                Figure::bound("e2e_floor_p50_ms", "ms", floor_p50, floor_p50),
                Figure::bound("e2e_floor_p99_ms", "ms", floor_p99, floor_p99),
            ]);
        } else {
            figures.extend([
                Figure::latency("e2e_latency_200_p50_ms", p50, floor_p50, 3.3),
                Figure::latency("e2e_latency_200_p99_ms", p99, floor_p99, 16.7),
                Figure::bound("e2e_floor_200_p50_ms", "ms", floor_p50, floor_p50),
                Figure::bound("e2e_floor_200_p99_ms", "ms", floor_p99, floor_p99),
            ]);
        }
    }
    Ok(figures)
}

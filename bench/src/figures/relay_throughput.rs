//! `relay_throughput` and `backlog_drain`.
//!
//! relay_throughput: a backlog of pending 1 KiB events (PostgreSQL outbox) drained by one relay into RabbitMQ
//! (durable classic queue, persistent messages, confirms), against raw lapin publishing the same messages to the
//! same queue with 256 confirms in flight, same run.
//!
//! backlog_drain: the drain rate of a 100,000-event backlog (as after a broker outage, when the relay could
//! publish nothing) against the relay's rate on a 20,000-event one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox::{Outbox, OutboxConfig, RelayConfig};

use crate::broker::Sink;
use crate::database::Scratch;
use crate::payload::{EVENT_TYPE, envelopes, payload};
use crate::report::{Figure, median};

const IN_FLIGHT: usize = 256;

/// Raw lapin: `count` confirmed publishes with `IN_FLIGHT` confirms outstanding.
pub async fn raw_lapin(sink: &Sink, count: u64) -> anyhow::Result<f64> {
    let channel = sink.channel.clone();
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(IN_FLIGHT);
    for seq in 0..count {
        if pending.len() == IN_FLIGHT
            && let Some(confirm) = pending.pop_front()
        {
            let confirm: lapin::PublisherConfirm = confirm;
            anyhow::ensure!(confirm.await?.is_ack(), "nack");
        }
        let mut headers = FieldTable::default();
        headers.insert("x-event-version".into(), AMQPValue::LongLongInt(1));
        let properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_type(EVENT_TYPE.into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let confirm = channel
            .basic_publish(sink.exchange.as_str().into(), EVENT_TYPE.into(), options, &payload(seq), properties)
            .await?;
        pending.push_back(confirm);
    }
    for confirm in pending {
        anyhow::ensure!(confirm.await?.is_ack(), "nack");
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Fills the outbox with `count` pending events (100 partition keys).
pub async fn backlog(outbox: &Outbox<sqlx::Postgres>, count: u64) -> anyhow::Result<()> {
    for chunk in envelopes(count, 100)?.chunks(1000) {
        let mut tx = outbox.pool().begin().await?;
        outbox.enqueue_envelopes(&mut tx, chunk).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// Starts a relay on a backlog of `count` and returns events/s until the outbox is empty.
pub async fn drain(outbox: &Outbox<sqlx::Postgres>, sink: &Sink, count: u64) -> anyhow::Result<f64> {
    let bus = sink.bus().await?;
    let relay = outbox.relay(Arc::new(bus.clone()), RelayConfig::default())?;
    let start = Instant::now();
    let handle = relay.spawn();
    while handle.stats().published < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    handle.shutdown().await;
    bus.shutdown().await;
    Ok(rate)
}

/// Three rounds of raw lapin then the relay draining a backlog of `count`, into `sink`: (relay, raw) rates.
async fn three_runs(
    name: &str,
    outbox: &Outbox<sqlx::Postgres>,
    scratch: &Scratch,
    sink: &Sink,
    count: u64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for run in 1..=3 {
        let r = raw_lapin(sink, count).await?;
        sink.purge().await?;
        backlog(outbox, count).await?;
        let o = drain(outbox, sink, count).await?;
        sink.purge().await?;
        sqlx::query("TRUNCATE bus_outbox").execute(&scratch.pool).await?;
        eprintln!(
            "{name} run {run}: relay {o:>7.0} events/s   raw lapin ({IN_FLIGHT} confirms in flight) {r:>7.0} msg/s"
        );
        ours.push(o);
        raw.push(r);
    }
    Ok((ours, raw))
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 5_000 } else { 20_000 };
    let scratch = Scratch::new(8).await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let sink = Sink::new().await?;
    let (ours, raw) = three_runs("relay_throughput", &outbox, &scratch, &sink, count).await?;
    let steady = median(ours);
    let mut figures = vec![Figure::ratio("relay_throughput", "events/s", steady, median(raw), 0.85)];

    let big = if quick { 20_000 } else { 100_000 };
    eprintln!("backlog_drain: filling a backlog of {big} events");
    backlog(&outbox, big).await?;
    let drained = drain(&outbox, &sink, big).await?;
    eprintln!("backlog_drain: {drained:.0} events/s over {big} pending vs steady {steady:.0} events/s");
    figures.push(Figure::ratio("backlog_drain", "events/s", drained, steady, 0.9));
    sink.purge().await?;
    sink.delete().await?;
    scratch.drop_schema().await?;
    Ok(figures)
}

/// `relay_throughput_quorum`: the same drain into a quorum queue on a 3-node cluster
/// (`tests/cluster/rabbitmq-cluster.sh`, started and stopped here; its confirms mean a majority has each message),
/// against raw lapin publishing to the same quorum queue in the same run. Also reports the classic figure of the
/// same run on the local node, side by side.
pub async fn run_quorum(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 5_000 } else { 20_000 };
    let cluster = crate::cluster::Cluster::start().await?;
    let urls = cluster.urls().await?;
    let scratch = Scratch::new(8).await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    let mut figures = Vec::new();
    for (name, sink) in [
        ("relay_throughput_quorum", Sink::on(&urls, bus_rabbitmq::QueueType::Quorum).await?),
        ("relay_throughput_classic_same_run", Sink::new().await?),
    ] {
        let (ours, raw) = three_runs(name, &outbox, &scratch, &sink, count).await?;
        figures.push(Figure::ratio(name, "events/s", median(ours), median(raw), 0.7));
        sink.delete().await?;
    }
    scratch.drop_schema().await?;
    cluster.stop().await?;
    Ok(figures)
}

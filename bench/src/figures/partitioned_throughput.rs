//! `partitioned_throughput`: events/s a partitioned consumer group drains with 3 instances against the same
//! group with 1 instance, same run. The figure is the scale-out a service gets from partitions while keeping
//! per-key order.
//!
//! A backlog of 1 KiB events over 200 keys waits in a 12-partition group; then the instances start together
//! (each its own RabbitMQ connection, 8 handlers at once, as separate processes would have) and the clock runs
//! until every event is handled. Each handling is an inbox transaction on PostgreSQL with a business row, as in
//! `consumer_inbox`. On this one 2-core machine the instances share the CPU with PostgreSQL and RabbitMQ, so
//! the ratio shows what partitioning costs or gains here, not what separate machines would give.

use std::time::{Duration, Instant};

use bus_core::{EventBus, GroupName, HandlerError, Subscription, SubscriptionHandle};
use bus_rabbitmq::{RabbitBus, RabbitConfig};
use outbox::{Inbox, InboxTransaction, SubscriptionInboxExt};

use crate::broker::url;
use crate::database::{inbox_scratch, insert_handled};
use crate::payload::{BenchEvent, envelopes};
use crate::report::{Figure, median};

const PARTITIONS: u16 = 12;
const KEYS: u64 = 200;
const INSTANCES: usize = 3;

async fn instance_bus(exchange: &str) -> anyhow::Result<RabbitBus> {
    let mut config = RabbitConfig::new(&url())?;
    config.exchange = exchange.to_owned();
    config.membership_heartbeat = Duration::from_millis(100);
    config.member_timeout = Duration::from_secs(1);
    Ok(RabbitBus::connect(config).await?)
}

fn subscription(group: &str, inbox: &Inbox<sqlx::Postgres>) -> Subscription {
    Subscription::new(GroupName::new(group).unwrap()).partitions(PARTITIONS).on_inbox(
        inbox,
        |event: BenchEvent, mut tx: InboxTransaction<sqlx::Postgres>| async move {
            let event_id = tx.delivery().event_id();
            insert_handled(&mut tx, event_id, event.seq).await.map_err(HandlerError::transient)
        },
    )
}

/// Drains a backlog of `count` events with `instances` instances; events/s.
async fn drain(instances: usize, count: u64, inbox: &Inbox<sqlx::Postgres>) -> anyhow::Result<f64> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (exchange, group) = (format!("bench.{id}"), format!("bench-part-{id}"));
    let publisher = instance_bus(&exchange).await?;
    // Declare the group (its partitions), then leave it with a backlog.
    publisher.subscribe(subscription(&group, inbox)).await?.shutdown().await;
    let mut confirmations = Vec::with_capacity(usize::try_from(count)?);
    for envelope in envelopes(count, KEYS)? {
        confirmations.push(publisher.publish(envelope).await?);
    }
    for confirmation in confirmations {
        confirmation.await?;
    }
    let mut buses = Vec::new();
    for _ in 0..instances {
        buses.push(instance_bus(&exchange).await?);
    }
    let start = Instant::now();
    let handles: Vec<SubscriptionHandle> =
        futures::future::try_join_all(buses.iter().map(|bus| bus.subscribe(subscription(&group, inbox)))).await?;
    let handled = || handles.iter().map(|h| h.stats().handled).sum::<u64>();
    while handled() < count {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "drain stalled at {} of {count}", handled());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    let shares: Vec<u64> = handles.iter().map(|h| h.stats().handled).collect();
    eprintln!("partitioned_throughput: {instances} instance(s) {rate:>7.0} events/s, handled per instance {shares:?}");
    for handle in handles {
        handle.shutdown().await;
    }
    for bus in buses.iter().chain([&publisher]) {
        bus.shutdown().await;
    }
    delete_topology(&exchange, &group).await?;
    Ok(rate)
}

async fn delete_topology(exchange: &str, group: &str) -> anyhow::Result<()> {
    let connection = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let mut queues = vec![format!("{group}.dlq"), format!("{group}.partition-count")];
    for index in 0..PARTITIONS {
        queues.push(format!("{group}.p{index:03}"));
    }
    for queue in queues {
        channel.queue_delete(queue.as_str().into(), Default::default()).await?;
    }
    let exchanges = ["partitions", "partitions.unbucketed", "members"].map(|suffix| format!("{group}.{suffix}"));
    for name in exchanges.iter().map(String::as_str).chain([exchange]) {
        channel.exchange_delete(name.into(), Default::default()).await?;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(())
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count = if quick { 4_000 } else { 20_000 };
    let (scratch, inbox) = inbox_scratch(8 * INSTANCES as u32 + 2).await?;
    let (mut ours_runs, mut base_runs) = (Vec::new(), Vec::new());
    for run in 1..=3 {
        sqlx::query("TRUNCATE handled").execute(&scratch.pool).await?;
        let one = drain(1, count, &inbox).await?;
        sqlx::query("TRUNCATE handled").execute(&scratch.pool).await?;
        let three = drain(INSTANCES, count, &inbox).await?;
        eprintln!(
            "partitioned_throughput run {run}: {INSTANCES} instances {three:>7.0} events/s   1 instance {one:>7.0} events/s"
        );
        ours_runs.push(three);
        base_runs.push(one);
    }
    scratch.drop_schema().await?;
    Ok(vec![Figure::ratio("partitioned_throughput", "events/s", median(ours_runs), median(base_runs), 1.0)])
}

//! `relay_rss_mib`: the peak resident memory of a process that runs only a relay while it drains 1,000,000
//! pending events (100,000 with `--quick`) to RabbitMQ. The benchmark fills the outbox with SQL, starts itself
//! as the relay process, drains the queue with an auto-ack consumer, and reads the child's peak RSS (VmHWM).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use outbox::{Outbox, OutboxConfig, RelayConfig};

use crate::broker::Sink;
use crate::database::Scratch;
use crate::report::Figure;

/// The argument that makes the benchmark binary run as the relay process.
pub const CHILD: &str = "__relay_child";

/// In the child: drain `count` events from `schema`'s outbox to `exchange`, then print the peak RSS in KiB.
pub async fn child(schema: &str, exchange: &str, count: u64) -> anyhow::Result<()> {
    let scratch_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(
            &std::env::var("BENCH_DATABASE_URL")
                .or_else(|_| std::env::var("DATABASE_URL"))
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        )
        .await?;
    let outbox = Outbox::new(scratch_pool, OutboxConfig::new("bench").schema(schema))?;
    let mut config = bus_rabbitmq::RabbitConfig::new(&crate::broker::url())?;
    config.exchange = exchange.to_owned();
    let bus = bus_rabbitmq::RabbitBus::connect(config).await?;
    let relay = outbox.relay(Arc::new(bus.clone()), RelayConfig::default())?.spawn();
    while relay.stats().published < count {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.shutdown().await;
    bus.shutdown().await;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let peak = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    println!("{}", peak.split_whitespace().nth(1).context("bad VmHWM")?);
    Ok(())
}

pub async fn run(quick: bool) -> anyhow::Result<Vec<Figure>> {
    let count: u64 = if quick { 100_000 } else { 1_000_000 };
    let scratch = Scratch::new(4).await?;
    let outbox = Outbox::new(scratch.pool.clone(), OutboxConfig::new("bench").schema(scratch.schema.clone()))?;
    outbox.migrate().await?;
    eprintln!("relay_rss: filling the outbox with {count} pending 1 KiB events");
    sqlx::query(
        "INSERT INTO bus_outbox (event_id, event_type, version, occurred_at, correlation_id, partition_key, source, payload) \
         SELECT gen_random_uuid(), 'BenchEvent', 1, now(), 'bench', 'key-' || (g % 100), 'bench', \
                convert_to('{\"seq\":' || g || ',\"data\":\"' || repeat('x', 1000) || '\"}', 'UTF8') \
         FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(count)?)
    .execute(&scratch.pool)
    .await?;
    let sink = Sink::new().await?;
    // Keep the broker's queue short: consume and auto-acknowledge in this process.
    let mut drain = sink
        .channel
        .basic_consume(
            sink.queue.as_str().into(),
            "rss-drain".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let draining = tokio::spawn(async move { while let Some(Ok(_)) = drain.next().await {} });
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args([CHILD, &scratch.schema, &sink.exchange, &count.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "relay process failed");
    let kib: f64 = String::from_utf8(output.stdout)?.trim().parse()?;
    let mib = kib / 1024.0;
    eprintln!(
        "relay_rss: drained {count} events in {:.0} s; peak RSS of the relay process {mib:.1} MiB",
        started.elapsed().as_secs_f64()
    );
    draining.abort();
    sink.delete().await?;
    scratch.drop_schema().await?;
    Ok(vec![Figure::bound("relay_rss_mib", "MiB", mib, 64.0)])
}

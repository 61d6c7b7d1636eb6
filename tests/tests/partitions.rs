//! Partitioned consumer groups on the real broker: per-key order across instances, partitions moving when an
//! instance dies or leaves, retries and redrives staying in their partition, and the partition count guarded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{
    BusError, DeadLetterQueue, DeliveryContext, EventBus, GroupName, HandlerError, RetryPolicy, Subscription,
};
use integration_tests::partitioned::{ConsumerSettings, PartitionLedger, create_consumer_schema};
use integration_tests::shop::ServiceProcess;
use integration_tests::{
    Numbered, amqp_url, database_url, delete_partitioned_topology, init_tracing, rabbit_bus, unique, wait_until,
};
use outbox::{Outbox, OutboxConfig, RelayConfig};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(60);

/// The acceptance test: 3 instances (processes) of a partitioned consumer, 20,000 events over 200 keys
/// published through an outbox, one instance SIGKILLed mid-way; per-key order at the handlers, nothing lost,
/// no duplicate effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_keep_order_per_key_when_one_is_killed() {
    const KEYS: u32 = 200;
    const PER_KEY: u32 = 100;
    const TOTAL: i64 = (KEYS * PER_KEY) as i64;
    const PARTITIONS: u16 = 12;
    init_tracing();
    let pool = PgPool::connect(&database_url().await).await.expect("PostgreSQL");
    let (producer_schema, consumer_schema) = (unique("p").replace('-', "_"), unique("c").replace('-', "_"));
    let group = unique("partitioned");
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();

    sqlx::query(&format!("CREATE SCHEMA \"{producer_schema}\"")).execute(&pool).await.unwrap();
    let outbox = Outbox::new(pool.clone(), OutboxConfig::new("producer").schema(&producer_schema)).unwrap();
    outbox.migrate().await.unwrap();
    create_consumer_schema(&pool, &consumer_schema, &group).await;

    let settings = |instance: &str| ConsumerSettings {
        database_url: String::new(),
        schema: consumer_schema.clone(),
        amqp_url: String::new(),
        exchange: exchange.clone(),
        group: group.clone(),
        partitions: PARTITIONS,
        instance: instance.to_owned(),
    };
    let (db_url, amqp) = (database_url().await, amqp_url().await);
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_partition-consumer"));
    let mut instances = Vec::new();
    for name in ["a", "b", "c"] {
        let settings = ConsumerSettings { database_url: db_url.clone(), amqp_url: amqp.clone(), ..settings(name) };
        instances.push(ServiceProcess::spawn_until(program, &[], &settings.env(), " listening on ").await);
    }

    let relay = outbox.relay(Arc::new(bus.clone()), RelayConfig { batch_size: 500, ..RelayConfig::default() })
        .unwrap()
        .spawn();
    let started = Instant::now();
    // Round by round, so that every key's events are spread over the whole run; in the background, so that the
    // kill lands while events are still being published and handled.
    let producer = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            for seq in 0..PER_KEY {
                let mut tx = outbox.begin().await.unwrap();
                for key in 0..KEYS {
                    tx.enqueue(&Numbered { key: format!("key-{key}"), seq }).await.unwrap();
                }
                tx.commit().await.unwrap();
                outbox.committed();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (p, s) = (&pool, consumer_schema.as_str());
    wait_until("a third of the events handled", WAIT, || async move { handled(p, s).await >= TOTAL / 3 }).await;
    let before_kill = PartitionLedger::read(&pool, &consumer_schema).await;
    let victim = 1; // instance "b"
    instances[victim].kill().await;
    let killed_at = handled(p, s).await;
    wait_until("every event handled after the kill", Duration::from_secs(300), || async move {
        handled(p, s).await >= TOTAL
    })
    .await;
    let elapsed = started.elapsed();
    producer.await.expect("producer");
    // Let anything still in flight (a redelivery) land before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = PartitionLedger::read(&pool, &consumer_schema).await;
    let taken_over: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{s}\".handled h WHERE h.instance <> 'b' AND h.key IN \
         (SELECT key FROM \"{s}\".handled WHERE instance = 'b')",
        s = consumer_schema
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    let line = format!(
        "partitions: events={TOTAL} keys={KEYS} partitions={PARTITIONS} instances=3 killed=b at {killed_at} handled \
         lost={} duplicate_effects={} out_of_order={} keys_not_in_sequence={} per_instance={:?} \
         before_kill={:?} taken_over_from_b={taken_over} elapsed_ms={}",
        TOTAL - ledger.distinct,
        ledger.duplicate_effects,
        ledger.out_of_order,
        ledger.keys_not_in_sequence,
        ledger.per_instance,
        before_kill.per_instance,
        elapsed.as_millis()
    );
    println!("{line}");
    assert_eq!(ledger.distinct, TOTAL, "lost events: {line}");
    assert_eq!(ledger.duplicate_effects, 0, "{line}");
    assert_eq!(ledger.out_of_order, 0, "{line}");
    assert_eq!(ledger.keys_not_in_sequence, 0, "{line}");
    assert_eq!(before_kill.per_instance.len(), 3, "every instance had partitions before the kill: {line}");
    assert!(taken_over > 0, "the killed instance's keys moved to the survivors: {line}");

    for (index, instance) in instances.iter_mut().enumerate() {
        if index != victim {
            assert!(instance.terminate(Duration::from_secs(30)).await, "graceful stop within 30 s");
        }
    }
    relay.shutdown().await;
    bus.shutdown().await;
    delete_partitioned_topology(&exchange, &group, PARTITIONS).await;
    for schema in [producer_schema, consumer_schema] {
        let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE")).execute(&pool).await;
    }
}

/// Distinct events the consumer in `schema` handled.
async fn handled(pool: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(DISTINCT event_id) FROM \"{schema}\".handled"))
        .fetch_one(pool)
        .await
        .expect("count handled")
}

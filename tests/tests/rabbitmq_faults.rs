//! Faults on the broker while the outbox relays to RabbitMQ. This binary closes every broker connection, so it
//! is its own test target (Cargo runs test binaries one at a time) and its tests run one at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::{EventBus, GroupName, HandlerError, Subscription};
use integration_tests::{Numbered, TestDb, delete_topology, rabbit_bus, unique, wait_until};
use outbox::{Inbox, InboxConfig, InboxTransaction, Outbox, RelayConfig, SubscriptionInboxExt};
use tokio::sync::Mutex;

/// Serializes the tests of this binary: each one breaks the broker for everybody.
static BROKER: Mutex<()> = Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl").args(args).status().expect("rabbitmqctl is installed");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

async fn relay_through_a_broker_fault(events: u32, fault: &'static [&'static [&'static str]]) {
    let _only_me = BROKER.lock().await;
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = Outbox::new(fixture.pool.clone(), fixture.outbox_config("producer")).unwrap();
    outbox.migrate().await.unwrap();
    let bus = rabbit_bus(|c| c.prefetch = 128).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("consumer");
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &bus.config().retry).unwrap();
    let effects = fixture.effects.clone();
    let consumer = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on_inbox(
            &inbox,
            move |_e: Numbered, mut tx: InboxTransaction<sqlx::Postgres>| {
                let effects = effects.clone();
                async move {
                    let event_id = tx.delivery().event_id();
                    sqlx::Postgres::record_effect(&mut tx, &effects, &event_id.to_string())
                        .await
                        .map_err(HandlerError::transient)
                }
            },
        ))
        .await
        .unwrap();
    // The whole backlog first, so that the fault hits a stream in full flow.
    for chunk in 0..events / 500 {
        let mut tx = outbox.begin().await.unwrap();
        for seq in 0..500 {
            tx.enqueue(&Numbered { key: format!("key-{}", seq % 50), seq: chunk * 500 + seq }).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let started = Instant::now();
    let relay =
        outbox.relay(Arc::new(bus.clone()), RelayConfig { batch_size: 200, ..RelayConfig::default() }).unwrap().spawn();
    let effects_recorded = |at_least: i64| {
        let (pool, table) = (fixture.pool.clone(), fixture.effects.clone());
        move || {
            let (pool, table) = (pool.clone(), table.clone());
            async move {
                let count: i64 = sqlx::query_scalar(&format!("SELECT count(DISTINCT event_id) FROM {table}"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                count >= at_least
            }
        }
    };
    wait_until("half the effects recorded", Duration::from_secs(120), effects_recorded(i64::from(events / 2))).await;
    assert!(outbox.status().await.unwrap().pending > 0, "the fault must hit while events are still flowing");
    for args in fault {
        tokio::task::spawn_blocking(move || rabbitmqctl(args)).await.unwrap();
    }
    wait_until("every event's effect recorded", Duration::from_secs(240), effects_recorded(i64::from(events))).await;
    let (total, distinct): (i64, i64) =
        sqlx::query_as(&format!("SELECT count(*), count(DISTINCT event_id) FROM {}", fixture.effects))
            .fetch_one(&fixture.pool)
            .await
            .unwrap();
    wait_until("outbox drained", Duration::from_secs(60), || async { outbox.status().await.unwrap().pending == 0 })
        .await;
    let status = outbox.status().await.unwrap();
    let stats = inbox.stats();
    eprintln!(
        "fault={fault:?} events={events} lost={} duplicate_effects={} duplicates_dropped_by_inbox={} relay_publish_failures={} reconnects={} settle_ms={}",
        i64::from(events) - distinct,
        total - distinct,
        stats.duplicates,
        relay.stats().publish_failures,
        bus.stats().reconnects,
        started.elapsed().as_millis()
    );
    // The supervisor notices a lost connection within its health-check period: wait for it, bounded.
    wait_until("the fault really broke the connection and the bus reconnected", Duration::from_secs(30), || async {
        bus.stats().reconnects >= 1
    })
    .await;
    assert_eq!(distinct, i64::from(events), "no event lost");
    assert_eq!(total, distinct, "no duplicate effect");
    assert_eq!((status.pending, status.failed), (0, 0), "outbox drained: {status:?}");
    relay.shutdown().await;
    consumer.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_broker_connections_closed_mid_stream_of_ten_thousand_events() {
    relay_through_a_broker_fault(10_000, &[&["close_all_connections", "fault injection test"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_started_mid_stream() {
    relay_through_a_broker_fault(5_000, &[&["stop_app"], &["start_app"]]).await;
}

/// A partitioned group (2 instances, 6 partitions) through a broker restart with a backlog in its partitions:
/// every key stays on its partition (the bucket bindings do not depend on broker state), publishes lost with the
/// connection are not overtaken, and the instances resume; per-key order and exactly-once effects hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_group_keeps_order_per_key_through_a_broker_restart() {
    use integration_tests::partitioned::{
        PartitionLedger, create_consumer_schema, handled_events, ledger_subscription,
    };
    const PARTITIONS: u16 = 6;
    const KEYS: u32 = 60;
    const PER_KEY: u32 = 100;
    let _only_me = BROKER.lock().await;
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = Outbox::new(fixture.pool.clone(), fixture.outbox_config("producer")).unwrap();
    outbox.migrate().await.unwrap();
    let consumer_schema = unique("c").replace('-', "_");
    let group = unique("partitioned");
    create_consumer_schema(&fixture.pool, &consumer_schema, &group).await;
    let fast = |c: &mut bus_rabbitmq::RabbitConfig| {
        c.membership_heartbeat = Duration::from_millis(100);
        c.member_timeout = Duration::from_secs(1);
    };
    let publisher = rabbit_bus(fast).await;
    let exchange = publisher.config().exchange.clone();
    let mut instances = Vec::new();
    for name in ["a", "b"] {
        let exchange = exchange.clone();
        let bus = rabbit_bus(move |c| {
            fast(c);
            c.exchange = exchange;
        })
        .await;
        let consumer_outbox =
            Outbox::new(fixture.pool.clone(), fixture.outbox_config(&group).schema(&consumer_schema)).unwrap();
        let inbox = Inbox::new(consumer_outbox, InboxConfig::default(), &bus.config().retry).unwrap();
        let handle =
            bus.subscribe(ledger_subscription(&inbox, &group, PARTITIONS, &consumer_schema, name)).await.unwrap();
        instances.push((bus, handle));
    }
    for seq in 0..PER_KEY {
        let mut tx = outbox.begin().await.unwrap();
        for key in 0..KEYS {
            tx.enqueue(&Numbered { key: format!("key-{key}"), seq }).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let total = i64::from(KEYS * PER_KEY);
    let relay = outbox
        .relay(Arc::new(publisher.clone()), RelayConfig { batch_size: 500, ..RelayConfig::default() })
        .unwrap()
        .spawn();
    let (pool, schema) = (&fixture.pool, consumer_schema.as_str());
    wait_until("a quarter handled", Duration::from_secs(120), || async move {
        handled_events(pool, schema).await >= total / 4
    })
    .await;
    for args in [&["stop_app"][..], &["start_app"][..]] {
        tokio::task::spawn_blocking(move || rabbitmqctl(args)).await.unwrap();
    }
    wait_until("every event handled after the restart", Duration::from_secs(240), || async move {
        handled_events(pool, schema).await >= total
    })
    .await;
    let ledger = PartitionLedger::read(pool, schema).await;
    eprintln!(
        "partitions through a broker restart: events={total} lost={} duplicate_effects={} out_of_order={} \
         keys_not_in_sequence={} per_instance={:?} reconnects={}",
        total - ledger.distinct,
        ledger.duplicate_effects,
        ledger.out_of_order,
        ledger.keys_not_in_sequence,
        ledger.per_instance,
        publisher.stats().reconnects
    );
    if ledger.out_of_order > 0 {
        let producer_schema = fixture.schema.as_deref().unwrap_or("public");
        let retried: Vec<(String, String, i32)> = sqlx::query_as(&format!(
            "SELECT partition_key, convert_from(payload, 'UTF8')::json->>'seq', attempts \
             FROM \"{producer_schema}\".bus_outbox WHERE attempts > 0 ORDER BY seq LIMIT 40"
        ))
        .fetch_all(pool)
        .await
        .unwrap();
        eprintln!("outbox rows published more than once: {retried:?}");
    }
    assert_eq!(ledger.distinct, total, "no event lost");
    assert_eq!(ledger.duplicate_effects, 0, "no duplicate effect");
    assert_eq!((ledger.out_of_order, ledger.keys_not_in_sequence), (0, 0), "per-key order");
    relay.shutdown().await;
    for (bus, handle) in instances {
        handle.shutdown().await;
        bus.shutdown().await;
    }
    publisher.shutdown().await;
    integration_tests::delete_partitioned_topology(&exchange, &group, PARTITIONS).await;
    let _ = sqlx::query(&format!("DROP SCHEMA \"{consumer_schema}\" CASCADE")).execute(&fixture.pool).await;
}

/// While the broker is down, `subscribe` fails after `publish_timeout`, naming the group, instead of waiting
/// for the broker without limit; once it is back, subscribing works again. The connection carries its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_while_the_broker_is_down_fails_in_time_and_connections_are_named() {
    let _only_me = BROKER.lock().await;
    let name = unique("named-connection");
    let bus = rabbit_bus(|c| {
        c.publish_timeout = Duration::from_secs(1);
        c.connection_name = name.clone();
    })
    .await;
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "client_properties"])
        .output()
        .expect("rabbitmqctl is installed");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&name), "the broker shows the connection's name");
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let subscription = || {
        Subscription::new(GroupName::new(&group).unwrap())
            .on::<Numbered, _>(|_e: Numbered, _ctx: bus_core::DeliveryContext| async { Ok::<(), HandlerError>(()) })
    };
    rabbitmqctl(&["stop_app"]);
    let started = Instant::now();
    let refused = tokio::time::timeout(Duration::from_secs(20), bus.subscribe(subscription())).await;
    rabbitmqctl(&["start_app"]);
    let error = refused.expect("subscribe returned").expect_err("no broker, no subscription");
    assert!(started.elapsed() < Duration::from_secs(10), "failed after {:?}", started.elapsed());
    assert!(error.to_string().contains(&group), "{error}");
    let handle = {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match bus.subscribe(subscription()).await {
                Ok(handle) => break handle,
                Err(error) if attempt < 30 => {
                    tracing::info!(%error, "broker not back yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => panic!("the broker came back but subscribing still fails: {error}"),
            }
        }
    };
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

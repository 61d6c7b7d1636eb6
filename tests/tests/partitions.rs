//! Partitioned consumer groups on the real broker: per-key order across instances, partitions moving when an
//! instance dies or leaves, retries and redrives staying in their partition, and the partition count guarded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{
    BusError, DeadLetterQueue, DeliveryContext, EventBus, GroupName, HandlerError, RetryPolicy, Subscription,
};
use integration_tests::partitioned::{ConsumerSettings, PartitionLedger, create_consumer_schema, handled_events};
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

    let relay =
        outbox.relay(Arc::new(bus.clone()), RelayConfig { batch_size: 500, ..RelayConfig::default() }).unwrap().spawn();
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
    wait_until("a third of the events handled, by all three instances", WAIT, || async move {
        handled_events(p, s).await >= TOTAL / 3 && PartitionLedger::read(p, s).await.per_instance.len() == 3
    })
    .await;
    let before_kill = PartitionLedger::read(&pool, &consumer_schema).await;
    let victim = 1; // instance "b"
    instances[victim].kill().await;
    let killed_at = handled_events(p, s).await;
    wait_until("every event handled after the kill", Duration::from_secs(300), || async move {
        handled_events(p, s).await >= TOTAL
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

/// One in-process instance's view of what it handled: (instance, key, seq), in handling order, and whether two
/// handlings of one key ever overlapped (across instances).
#[derive(Clone, Default)]
struct Journal {
    handled: Arc<Mutex<Vec<(usize, String, u32)>>>,
    in_progress: Arc<Mutex<HashSet<String>>>,
    overlaps: Arc<std::sync::atomic::AtomicUsize>,
}

impl Journal {
    fn subscription(&self, group: &str, partitions: u16, instance: usize) -> Subscription {
        let journal = self.clone();
        Subscription::new(GroupName::new(group).unwrap()).partitions(partitions).concurrency(4).on::<Numbered, _>(
            move |event: Numbered, _ctx: DeliveryContext| {
                let journal = journal.clone();
                async move {
                    if !journal.in_progress.lock().unwrap().insert(event.key.clone()) {
                        journal.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    // Long enough for handlings to be in flight when partitions move.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    journal.in_progress.lock().unwrap().remove(&event.key);
                    journal.handled.lock().unwrap().push((instance, event.key, event.seq));
                    Ok(())
                }
            },
        )
    }

    fn count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }

    /// Keys whose handlings are not exactly 0, 1, 2, … in order.
    fn keys_out_of_sequence(&self) -> Vec<String> {
        let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (_, key, seq) in self.handled.lock().unwrap().iter() {
            per_key.entry(key.clone()).or_default().push(*seq);
        }
        per_key
            .into_iter()
            .filter(|(_, seqs)| seqs.iter().enumerate().any(|(i, s)| *s as usize != i))
            .map(|(k, _)| k)
            .collect()
    }

    fn per_instance(&self) -> HashMap<usize, usize> {
        let mut counts = HashMap::new();
        for (instance, _, _) in self.handled.lock().unwrap().iter() {
            *counts.entry(*instance).or_default() += 1;
        }
        counts
    }
}

fn fast_membership(config: &mut bus_rabbitmq::RabbitConfig) {
    config.membership_heartbeat = Duration::from_millis(100);
    config.member_timeout = Duration::from_millis(1000);
}

async fn publish_rounds(bus: &bus_rabbitmq::RabbitBus, keys: u32, seqs: std::ops::Range<u32>) {
    for seq in seqs {
        let mut confirmations = Vec::new();
        for key in 0..keys {
            let envelope =
                bus_core::Envelope::for_event(&Numbered { key: format!("k{key}"), seq }).unwrap().build().unwrap();
            confirmations.push(bus.publish(envelope).await.expect("publish"));
        }
        for confirmation in confirmations {
            confirmation.await.expect("confirmed");
        }
    }
}

/// Publishes rounds (one event per key, next position) until `at_least` rounds are out and every one of
/// `instances` has handled something.
async fn publish_until(
    publisher: &bus_rabbitmq::RabbitBus,
    journal: &Journal,
    keys: u32,
    instances: &[usize],
    rounds: &mut u32,
    at_least: u32,
) {
    while *rounds < at_least || !instances.iter().all(|i| journal.per_instance().get(i).is_some_and(|n| *n > 0)) {
        assert!(*rounds < 1_000, "instances {instances:?} never got partitions: {:?}", journal.per_instance());
        publish_rounds(publisher, keys, *rounds..*rounds + 1).await;
        *rounds += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Instances leave gracefully and join while events flow: the partitions move between them and each key is
/// still handled once, in order, never by two instances at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_in_order_when_instances_leave_and_join() {
    const KEYS: u32 = 30;
    const PARTITIONS: u16 = 6;
    let publisher = rabbit_bus(fast_membership).await;
    let exchange = publisher.config().exchange.clone();
    let group = unique("svc");
    let journal = Journal::default();
    let instance_bus = || async {
        let exchange = exchange.clone();
        rabbit_bus(move |c| {
            fast_membership(c);
            c.exchange = exchange;
        })
        .await
    };
    let mut buses = Vec::new();
    let mut handles = Vec::new();
    for instance in 0..3 {
        let bus = instance_bus().await;
        handles.push(Some(bus.subscribe(journal.subscription(&group, PARTITIONS, instance)).await.expect("subscribe")));
        buses.push(bus);
    }
    // Rounds go on until the instances share the partitions (membership settles within a few heartbeats).
    let mut rounds = 0;
    publish_until(&publisher, &journal, KEYS, &[0, 1, 2], &mut rounds, 30).await;
    // Instance 1 leaves while events are in flight; a fourth joins later.
    let leaving = handles[1].take().unwrap().shutdown();
    let more = publish_rounds(&publisher, KEYS, rounds..rounds + 30);
    tokio::join!(leaving, more);
    rounds += 30;
    let joiner = instance_bus().await;
    let joined = joiner.subscribe(journal.subscription(&group, PARTITIONS, 3)).await.expect("subscribe");
    let at_least = rounds + 30;
    publish_until(&publisher, &journal, KEYS, &[0, 2, 3], &mut rounds, at_least).await;
    let total = (KEYS * rounds) as usize;
    wait_until("every event handled", WAIT, || async { journal.count() >= total }).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // anything handled twice would show now

    let per_instance = journal.per_instance();
    assert_eq!(journal.count(), total, "each event handled exactly once: {per_instance:?}");
    assert_eq!(journal.keys_out_of_sequence(), Vec::<String>::new(), "per-key order");
    assert_eq!(journal.overlaps.load(Ordering::SeqCst), 0, "a key handled by two instances at once");
    for instance in [0, 1, 2, 3] {
        assert!(
            per_instance.get(&instance).copied().unwrap_or(0) > 0,
            "instance {instance} got partitions: {per_instance:?}"
        );
    }

    joined.shutdown().await;
    for handle in handles.into_iter().flatten() {
        handle.shutdown().await;
    }
    for bus in buses.iter().chain([&joiner, &publisher]) {
        bus.shutdown().await;
    }
    delete_partitioned_topology(&exchange, &group, PARTITIONS).await;
}

/// A partitioned group retries in place: a failing event holds back the later events of its key (and only of
/// its key) until it succeeds, so order per key survives failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_is_never_overtaken_by_later_events_of_its_key() {
    const PARTITIONS: u16 = 2;
    let bus = rabbit_bus(fast_membership).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let journal: Arc<Mutex<Vec<(String, u32, u32)>>> = Arc::default();
    let j = journal.clone();
    let retry = RetryPolicy::exponential(4, Duration::from_millis(150)).with_jitter(0.0);
    let handle = bus
        .subscribe(
            Subscription::new(GroupName::new(&group).unwrap()).partitions(PARTITIONS).retry(retry).on::<Numbered, _>(
                move |event: Numbered, ctx: DeliveryContext| {
                    let journal = j.clone();
                    async move {
                        if event.key == "slow" && event.seq == 0 && ctx.attempt() < 3 {
                            return Err(HandlerError::transient("not yet"));
                        }
                        journal.lock().unwrap().push((event.key, event.seq, ctx.attempt()));
                        Ok(())
                    }
                },
            ),
        )
        .await
        .expect("subscribe");
    let mut confirmations = Vec::new();
    for seq in 0..5 {
        for key in ["slow", "f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"] {
            let envelope = bus_core::Envelope::for_event(&Numbered { key: key.into(), seq }).unwrap().build().unwrap();
            confirmations.push(bus.publish(envelope).await.unwrap());
        }
    }
    for confirmation in confirmations {
        confirmation.await.expect("confirmed");
    }
    wait_until("every event handled", WAIT, || async { journal.lock().unwrap().len() == 45 }).await;
    let journal = journal.lock().unwrap().clone();
    let slow: Vec<(u32, u32)> = journal.iter().filter(|(k, _, _)| k == "slow").map(|(_, s, a)| (*s, *a)).collect();
    assert_eq!(
        slow,
        vec![(0, 3), (1, 1), (2, 1), (3, 1), (4, 1)],
        "the slow key in order, its first event on attempt 3"
    );
    let first_slow = journal.iter().position(|(k, _, _)| k == "slow").unwrap();
    assert!(first_slow >= 20, "other keys went on while the slow key waited: {journal:?}");
    assert_eq!(bus.stats().retried, 2);
    assert_eq!(bus.stats().dead_lettered, 0);
    handle.shutdown().await;
    bus.shutdown().await;
    delete_partitioned_topology(&exchange, &group, PARTITIONS).await;
}

/// A failed handling is retried in place, then dead-lettered; a dead letter is redriven through the partitions
/// to the partition of its key; replay to the group does the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_redrives_and_replays_stay_in_the_partition_of_their_key() {
    const PARTITIONS: u16 = 4;
    let bus = rabbit_bus(fast_membership).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let group_name = GroupName::new(&group).unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let seen: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let (b, s) = (broken.clone(), seen.clone());
    let retry = RetryPolicy::exponential(2, Duration::from_millis(50)).with_jitter(0.0);
    let handle = bus
        .subscribe(
            Subscription::new(GroupName::new(&group).unwrap()).partitions(PARTITIONS).retry(retry).on::<Numbered, _>(
                move |event: Numbered, ctx: DeliveryContext| {
                    let (broken, seen) = (b.clone(), s.clone());
                    async move {
                        seen.lock().unwrap().push((event.seq, ctx.attempt()));
                        if broken.load(Ordering::SeqCst) && event.key == "poisoned" {
                            return Err(HandlerError::transient("down"));
                        }
                        Ok(())
                    }
                },
            ),
        )
        .await
        .expect("subscribe");
    let publish = |key: &str, seq: u32| {
        bus_core::Envelope::for_event(&Numbered { key: key.into(), seq }).unwrap().build().unwrap()
    };
    bus.publish(publish("poisoned", 1)).await.unwrap().await.expect("confirmed");
    wait_until("retried, then dead-lettered", WAIT, || async { bus.stats().dead_lettered == 1 }).await;
    assert_eq!(
        seen.lock().unwrap().iter().map(|(_, a)| *a).collect::<Vec<_>>(),
        vec![1, 2],
        "one retry, then given up"
    );
    assert_eq!(bus.stats().retried, 1);

    broken.store(false, Ordering::SeqCst);
    assert_eq!(bus.redrive(&group_name, None).await.expect("redrive"), 1);
    wait_until("the redriven event handled", WAIT, || async { seen.lock().unwrap().len() == 3 }).await;
    // Replay to the group only: through the partitions, so it is routable (the group has no plain queue).
    bus.publish_to_group(&group_name, publish("poisoned", 2)).await.unwrap().await.expect("replay confirmed");
    wait_until("the replayed event handled", WAIT, || async { seen.lock().unwrap().len() == 4 }).await;
    assert_eq!(bus.stats().handled, 2);
    assert!(bus.dead_letters(&group_name).await.unwrap().is_empty());

    handle.shutdown().await;
    bus.shutdown().await;
    delete_partitioned_topology(&exchange, &group, PARTITIONS).await;
}

/// The partition count is fixed for the life of a group: another count than the broker's is refused, naming
/// the setting; out-of-range counts and retry schedules too long to hold in place are refused before anything is
/// declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_settings_are_checked() {
    let bus = rabbit_bus(fast_membership).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let on = |partitions: u16| {
        Subscription::new(GroupName::new(&group).unwrap())
            .partitions(partitions)
            .on::<Numbered, _>(|_e: Numbered, _ctx: DeliveryContext| async { Ok::<_, HandlerError>(()) })
    };
    for bad in [0, bus_core::MAX_PARTITIONS + 1] {
        let err = bus.subscribe(on(bad)).await.unwrap_err();
        assert!(matches!(err, BusError::InvalidConfig { .. }) && err.to_string().contains("partitions"), "{err}");
    }
    let long_retry = RetryPolicy::exponential(30, Duration::from_secs(1)).with_max_delay(Duration::from_secs(60));
    let err = bus.subscribe(on(4).retry(long_retry)).await.unwrap_err();
    assert!(err.to_string().contains("retry") && err.to_string().contains("in place"), "{err}");
    let first = bus.subscribe(on(4)).await.expect("4 partitions");
    let again = bus.subscribe(on(4)).await.expect("the same count again");
    for other in [2, 8] {
        let err = bus.subscribe(on(other)).await.unwrap_err().to_string();
        assert!(err.contains("partitions") && err.contains(&format!("{group}.partition-count")), "{err}");
    }
    again.shutdown().await;
    first.shutdown().await;
    bus.shutdown().await;
    delete_partitioned_topology(&exchange, &group, 4).await;
}

/// Keyed events retry in place on every group, partitioned or not: a key whose first event fails twice holds
/// back only its own later events, never overtaken by them, and while it waits between attempts it holds no
/// handler permit, so three such keys on an instance of concurrency 2 do not stall the other keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_key_waits_in_place_and_holds_back_no_other_key() {
    for partitions in [None, Some(2u16)] {
        let bus = rabbit_bus(fast_membership).await;
        let exchange = bus.config().exchange.clone();
        let group = unique("svc");
        let journal: Arc<Mutex<Vec<(String, u32, u32)>>> = Arc::default();
        let j = journal.clone();
        let retry = RetryPolicy::exponential(4, Duration::from_millis(300)).with_jitter(0.0);
        let subscription = Subscription::new(GroupName::new(&group).unwrap())
            .concurrency(2)
            .retry(retry)
            .on::<Numbered, _>(move |event: Numbered, ctx: DeliveryContext| {
                let journal = j.clone();
                async move {
                    if event.key.starts_with("slow") && event.seq == 0 && ctx.attempt() < 3 {
                        return Err(HandlerError::transient("not yet"));
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    journal.lock().unwrap().push((event.key, event.seq, ctx.attempt()));
                    Ok(())
                }
            });
        let subscription = match partitions {
            Some(n) => subscription.partitions(n),
            None => subscription,
        };
        let handle = bus.subscribe(subscription).await.expect("subscribe");
        let keys = ["slow0", "slow1", "slow2", "f0", "f1", "f2", "f3", "f4", "f5"];
        let mut confirmations = Vec::new();
        for seq in 0..5 {
            for key in keys {
                let envelope =
                    bus_core::Envelope::for_event(&Numbered { key: key.into(), seq }).unwrap().build().unwrap();
                confirmations.push(bus.publish(envelope).await.unwrap());
            }
        }
        for confirmation in confirmations {
            confirmation.await.expect("confirmed");
        }
        wait_until("every event handled", WAIT, || async { journal.lock().unwrap().len() == 45 }).await;
        let journal = journal.lock().unwrap().clone();
        for key in keys {
            let seqs: Vec<u32> = journal.iter().filter(|(k, _, _)| k == key).map(|(_, s, _)| *s).collect();
            assert_eq!(seqs, vec![0, 1, 2, 3, 4], "{partitions:?}: key {key} in order: {journal:?}");
        }
        let first_slow = journal.iter().position(|(k, _, _)| k.starts_with("slow")).unwrap();
        assert_eq!(
            first_slow, 30,
            "{partitions:?}: every event of the other keys went while the slow keys waited: {journal:?}"
        );
        assert_eq!(bus.stats().retried, 6, "{partitions:?}");
        handle.shutdown().await;
        bus.shutdown().await;
        match partitions {
            Some(n) => delete_partitioned_topology(&exchange, &group, n).await,
            None => integration_tests::delete_topology(&exchange, &[&group]).await,
        }
    }
}

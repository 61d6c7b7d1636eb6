//! The outbox, the relay and the inbox against real PostgreSQL and SQLite. Each scenario runs on both.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{
    BusError, Confirmation, DeliveryContext, Envelope, EventBus, GroupName, HandlerError, RetryPolicy, Subscription,
    SubscriptionHandle,
};
use bus_inproc::{InProcBus, InProcConfig};
use integration_tests::{Fixture, HangingBus, Numbered, TestDb, fast_relay, on_both_databases, wait_until};
use outbox::{Inbox, InboxConfig, InboxTransaction, Outbox, OutboxError, RelayConfig, SubscriptionInboxExt};

const SETTLE: Duration = Duration::from_secs(60);

on_both_databases!(
    rolled_back_events_are_never_published,
    relay_killed_between_confirm_and_mark_redelivers_and_the_inbox_keeps_the_effect_single,
    relay_killed_before_publishing_leaves_its_rows_to_the_next_relay,
    two_relays_publish_ten_thousand_events_once_each_in_key_order,
    concurrent_duplicate_deliveries_run_the_handler_once,
    unpublishable_events_become_failed_after_their_attempts_and_can_be_retried,
    retention_cleanup_deletes_old_published_and_inbox_rows_only,
    oversized_events_and_bad_settings_are_refused,
    events_a_handler_publishes_carry_correlation_and_causation_and_commit_with_it,
    a_replay_from_a_point_in_time_starts_at_the_first_event_enqueued_since,
    a_scheduled_event_is_published_when_due_and_holds_back_its_key,
    a_handler_uses_its_inbox_transaction_in_helpers_one_after_the_other_without_waiting,
    an_inbox_transaction_that_outlives_its_handler_fails_the_handling_at_once,
    enqueue_on_a_transaction_of_ones_own_wakes_the_relay_when_it_commits,
    enqueue_on_a_bare_connection_writes_all_the_events_or_none,
    a_handling_cut_short_by_a_timeout_counts_as_failed_and_leaves_nothing,
    enqueue_inside_a_transaction_begun_by_hand_belongs_to_it,
    in_process_dead_letters_are_kept_in_the_service_database_and_survive_a_crash,
);

async fn outbox<DB: TestDb>(fixture: &Fixture<DB>) -> Outbox<DB> {
    integration_tests::migrated_outbox(fixture).await
}

/// Waits until the outbox has nothing pending and the bus has handled everything it took.
async fn settle<DB: TestDb>(outbox: &Outbox<DB>, bus: &InProcBus) {
    wait_until("outbox drained and bus settled", SETTLE, || async {
        bus.settled().await;
        outbox.status().await.expect("status").pending == 0 && bus.stats().outstanding == 0
    })
    .await;
}

async fn enqueue_committed<DB: TestDb>(
    outbox: &Outbox<DB>,
    events: impl IntoIterator<Item = Numbered>,
) -> Vec<uuid::Uuid> {
    let mut tx = outbox.begin().await.expect("begin");
    let mut ids = Vec::new();
    for event in events {
        ids.push(tx.enqueue(&event).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");
    ids
}

/// A consumer whose handler writes one effect row per event through the inbox, and counts its own runs.
struct Consumer {
    runs: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Numbered>>>,
    _handle: SubscriptionHandle,
}

async fn inbox_consumer<DB: TestDb>(
    fixture: &Fixture<DB>,
    outbox: &Outbox<DB>,
    bus: &InProcBus,
) -> (Consumer, Inbox<DB>) {
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &bus.config().retry).expect("inbox");
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (r, s, effects) = (runs.clone(), seen.clone(), fixture.effects.clone());
    let handler = move |event: Numbered, mut tx: InboxTransaction<DB>| {
        let (runs, seen, effects) = (r.clone(), s.clone(), effects.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let event_id = tx.delivery().event_id();
            DB::record_effect(&mut tx, &effects, &event_id.to_string()).await.map_err(HandlerError::transient)?;
            seen.lock().unwrap().push(event);
            Ok(())
        }
    };
    let handle = bus
        .subscribe(Subscription::new(GroupName::from_static("consumer")).on_inbox(&inbox, handler))
        .await
        .expect("subscribe");
    (Consumer { runs, seen, _handle: handle }, inbox)
}

fn numbered(key: &str, range: std::ops::Range<u32>) -> Vec<Numbered> {
    range.map(|seq| Numbered { key: key.into(), seq }).collect()
}

async fn rolled_back_events_are_never_published<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (consumer, _inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();

    // A business write and an event in one transaction, rolled back: neither exists.
    let mut tx = outbox.begin().await.unwrap();
    DB::record_effect(&mut tx, &fixture.effects, "business row").await.unwrap();
    tx.enqueue(&Numbered { key: "k".into(), seq: 0 }).await.unwrap();
    tx.rollback().await.unwrap();
    {
        let mut dropped = outbox.begin().await.unwrap();
        dropped.enqueue(&Numbered { key: "k".into(), seq: 1 }).await.unwrap();
        // dropped without commit
    }
    let committed = enqueue_committed(&outbox, numbered("k", 2..3)).await;
    settle(&outbox, &bus).await;

    assert_eq!(consumer.seen.lock().unwrap().clone(), numbered("k", 2..3), "only the committed event arrives");
    assert_eq!(DB::effects(&fixture.pool, &fixture.effects).await, vec![committed[0].to_string()]);
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.published, status.failed), (0, 1, 0));
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// Passes publishes to the real bus, but once `withhold` is set, never answers their confirmations: the relay
/// is left waiting between the broker's confirm and its mark, where the test kills it.
struct WithholdingBus {
    inner: InProcBus,
    withhold: Arc<AtomicBool>,
    confirmed_by_inner: Arc<AtomicUsize>,
}

#[async_trait]
impl EventBus for WithholdingBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        let inner = self.inner.publish(envelope).await?;
        let (withhold, confirmed) = (self.withhold.clone(), self.confirmed_by_inner.clone());
        Ok(Confirmation::from_future(async move {
            inner.await?;
            confirmed.fetch_add(1, Ordering::SeqCst);
            if withhold.load(Ordering::SeqCst) {
                futures::future::pending::<()>().await;
            }
            Ok(())
        }))
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        self.inner.subscribe(subscription).await
    }

    async fn health(&self) -> Result<(), BusError> {
        self.inner.health().await
    }
}

async fn relay_killed_between_confirm_and_mark_redelivers_and_the_inbox_keeps_the_effect_single<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (consumer, inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let withholding = WithholdingBus {
        inner: bus.clone(),
        withhold: Arc::new(AtomicBool::new(true)),
        confirmed_by_inner: Arc::default(),
    };
    let confirmed = withholding.confirmed_by_inner.clone();
    // One batch holds all 200 events; the doomed relay keeps its lease alive while it waits for confirmations.
    let one_batch = RelayConfig { batch_size: 500, ..fast_relay() };
    let doomed = outbox.relay(Arc::new(withholding), one_batch).unwrap().spawn();

    // 200 keys: a relay sends a key's next event only once the previous one is confirmed, and here no
    // confirmation ever comes back.
    let events = (0..200).map(|seq| Numbered { key: format!("k{seq}"), seq });
    let ids = enqueue_committed(&outbox, events).await;
    wait_until("the bus confirmed all 200 events", SETTLE, || async { confirmed.load(Ordering::SeqCst) == 200 }).await;
    bus.settled().await;
    doomed.kill().await; // between the confirm and the mark

    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.published), (200, 0), "the killed relay marked nothing");
    let survivor = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    settle(&outbox, &bus).await;

    let mut effects = DB::effects(&fixture.pool, &fixture.effects).await;
    let mut expected: Vec<String> = ids.iter().map(ToString::to_string).collect();
    // 200 keys are handled concurrently: the effects' order is not the events' order.
    effects.sort();
    expected.sort();
    assert!(
        effects == expected,
        "each event's effect exactly once: {} effects of {} events",
        effects.len(),
        expected.len()
    );
    assert_eq!(bus.stats().published, 400, "every event was delivered twice");
    let stats = inbox.stats();
    assert_eq!((stats.handled, stats.duplicates), (200, 200), "the inbox dropped the 200 redeliveries");
    assert_eq!(consumer.runs.load(Ordering::SeqCst), 200, "the handler body ran once per event");
    assert_eq!(outbox.status().await.unwrap().published, 200);
    survivor.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn relay_killed_before_publishing_leaves_its_rows_to_the_next_relay<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (consumer, inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let stuck = outbox.relay(Arc::new(HangingBus), fast_relay()).unwrap().spawn();
    enqueue_committed(&outbox, numbered("k", 0..50)).await;
    wait_until("the stuck relay claimed the rows", SETTLE, || async { outbox.status().await.unwrap().in_flight == 50 })
        .await;
    stuck.kill().await;

    let survivor = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    settle(&outbox, &bus).await;
    assert_eq!(consumer.seen.lock().unwrap().clone(), numbered("k", 0..50), "all delivered, in order");
    assert_eq!((inbox.stats().handled, inbox.stats().duplicates), (50, 0));
    assert_eq!(bus.stats().published, 50, "nothing was published twice");
    survivor.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn two_relays_publish_ten_thousand_events_once_each_in_key_order<DB: TestDb>() {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 100;
    let fixture = DB::fixture().await;
    let outbox_a = outbox(&fixture).await;
    // The second relay works as another process would: its own pool and outbox instance.
    let outbox_b = Outbox::new(DB::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::with_config(InProcConfig { queue_capacity: 1_000, ..InProcConfig::default() }).unwrap();
    let order: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let ids: Arc<Mutex<Vec<uuid::Uuid>>> = Arc::default();
    let (o, i) = (order.clone(), ids.clone());
    let _consumer = bus
        .subscribe(Subscription::new(GroupName::from_static("consumer")).concurrency(8).on::<Numbered, _>(
            move |e: Numbered, ctx: DeliveryContext| {
                let (order, ids) = (o.clone(), i.clone());
                async move {
                    ids.lock().unwrap().push(ctx.event_id());
                    order.lock().unwrap().entry(e.key).or_default().push(e.seq);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    // A lease longer than any statement can wait for a lock: "normal operation". (With 500 ms, a SQLite write
    // that waits a second for the lock under the parallel test load lets a lease expire, which the relay reports
    // as a possible duplicate.)
    let config = RelayConfig { batch_size: 64, lease: Duration::from_secs(10), ..fast_relay() };
    let relay_a = outbox_a.relay(Arc::new(bus.clone()), config.clone()).unwrap().spawn();
    let relay_b = outbox_b.relay(Arc::new(bus.clone()), config).unwrap().spawn();

    // Produce while both relays run: 100 transactions of 100 events, keys interleaved.
    for round in 0..PER_KEY {
        let events: Vec<Numbered> = (0..KEYS).map(|k| Numbered { key: format!("key-{k}"), seq: round }).collect();
        enqueue_committed(&outbox_a, events).await;
    }
    settle(&outbox_a, &bus).await;

    let ids = std::mem::take(&mut *ids.lock().unwrap());
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), (KEYS * PER_KEY) as usize, "each event delivered once: no duplicate, none lost");
    assert_eq!(unique.len(), ids.len());
    let order = std::mem::take(&mut *order.lock().unwrap());
    let reordered: usize = order.values().map(|seqs| seqs.windows(2).filter(|w| w[0] >= w[1]).count()).sum();
    for (key, seqs) in order.iter().filter(|(_, s)| s.windows(2).any(|w| w[0] >= w[1])).take(3) {
        eprintln!("out of order: key {key} arrived as {seqs:?}");
    }
    assert_eq!(reordered, 0, "per-key order kept across two relays");
    // The stats count a write-back once the relay's loop handled it, which may trail the database: read them
    // once the relays stopped.
    let (monitor_a, monitor_b) = (relay_a.monitor(), relay_b.monitor());
    relay_a.shutdown().await;
    relay_b.shutdown().await;
    let (a, b) = (monitor_a.stats().published, monitor_b.stats().published);
    eprintln!("relay a published {a}, relay b published {b}");
    assert_eq!(a + b, u64::from(KEYS * PER_KEY));
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn concurrent_duplicate_deliveries_run_the_handler_once<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &RetryPolicy::default()).unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let (r, effects) = (runs.clone(), fixture.effects.clone());
    let handler = inbox.handler::<Numbered, _>(move |_e: Numbered, mut tx: InboxTransaction<DB>| {
        let (runs, effects) = (r.clone(), effects.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            DB::record_effect(&mut tx, &effects, "the-effect").await.map_err(HandlerError::transient)?;
            // Hold the transaction open so that the duplicates really overlap with it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(())
        }
    });
    let envelope = Arc::new(Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap());
    let group = GroupName::new("consumer").unwrap();
    let deliveries = (0..10).map(|_| {
        let (handler, ctx) =
            (handler.clone(), bus_core::transport::delivery_context(envelope.clone(), 1, group.clone()));
        tokio::spawn(async move { handler.handle(ctx).await })
    });
    for result in futures::future::join_all(deliveries).await {
        result.unwrap().unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(DB::effects(&fixture.pool, &fixture.effects).await.len(), 1, "one effect");
    assert_eq!((inbox.stats().handled, inbox.stats().duplicates), (1, 9));

    // A handler that fails leaves no inbox row: the retry runs it again.
    let failing = inbox.handler::<Numbered, _>(|_e: Numbered, _tx: InboxTransaction<DB>| async {
        Err(HandlerError::transient("try later"))
    });
    let other = Arc::new(Envelope::for_event(&Numbered { key: "k".into(), seq: 2 }).unwrap().build().unwrap());
    assert!(failing.handle(bus_core::transport::delivery_context(other.clone(), 1, group.clone())).await.is_err());
    handler.handle(bus_core::transport::delivery_context(other, 2, group)).await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "after a failed attempt the event is handled for real");
}

async fn unpublishable_events_become_failed_after_their_attempts_and_can_be_retried<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new(); // nobody subscribed yet: every publish is unroutable
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    let ids = enqueue_committed(&outbox, numbered("k", 0..1)).await;
    wait_until("the event is marked failed", SETTLE, || async { outbox.status().await.unwrap().failed == 1 }).await;

    let failed = outbox.failed(10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].event_id, ids[0]);
    assert_eq!(failed[0].attempts, 3);
    assert!(failed[0].last_error.as_deref().unwrap_or("").contains("routed to no consumer group"), "{failed:?}");
    // No hot loop: once failed, the relay leaves it alone.
    let failures = relay.stats().publish_failures;
    assert_eq!(failures, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.stats().publish_failures, failures, "a failed row is not retried by itself");
    assert_eq!(outbox.status().await.unwrap().pending, 0);

    let (consumer, _inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    assert_eq!(outbox.retry_failed(Some(ids[0])).await.unwrap(), 1);
    settle(&outbox, &bus).await;
    assert_eq!(consumer.seen.lock().unwrap().clone(), numbered("k", 0..1));
    let status = outbox.status().await.unwrap();
    assert_eq!((status.failed, status.published), (0, 1));
    assert_eq!(outbox.retry_failed(None).await.unwrap(), 0);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn retention_cleanup_deletes_old_published_and_inbox_rows_only<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (_consumer, _inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    enqueue_committed(&outbox, numbered("k", 0..25)).await;
    settle(&outbox, &bus).await;
    relay.shutdown().await;
    // One more event that stays pending: cleanup must never touch it.
    enqueue_committed(&outbox, numbered("k", 25..26)).await;

    let keep_long = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap();
    assert_eq!(keep_long.cleanup().await.unwrap(), 0, "rows inside the retention window are kept");
    let short = RelayConfig { retention: Duration::from_millis(1), cleanup_batch: 10, ..fast_relay() };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cleaner = outbox.relay(Arc::new(bus.clone()), short).unwrap();
    assert_eq!(cleaner.cleanup().await.unwrap(), 25, "deleted in batches of 10 until none is left");
    let status = outbox.status().await.unwrap();
    assert_eq!((status.published, status.pending), (0, 1));

    let no_retry = RetryPolicy::no_retry();
    let inbox_config = InboxConfig { retention: Duration::from_millis(5), cleanup_batch: 7, ..InboxConfig::default() };
    let inbox = Inbox::new(outbox.clone(), inbox_config, &no_retry).unwrap();
    assert_eq!(inbox.cleanup().await.unwrap(), 25, "inbox rows past retention deleted");
    assert_eq!(inbox.cleanup().await.unwrap(), 0);
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn oversized_events_and_bad_settings_are_refused<DB: TestDb>() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Blob {
        data: String,
    }
    impl bus_core::IntegrationEvent for Blob {
        const TYPE_NAME: &'static str = "Blob";
    }
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    outbox.migrate().await.expect("migrating again is a no-op");
    let mut tx = outbox.begin().await.unwrap();
    let err = tx.enqueue(&Blob { data: "x".repeat(300 * 1024) }).await.unwrap_err();
    assert!(matches!(&err, OutboxError::Bus(BusError::PayloadTooLarge { .. })), "{err}");
    assert!(err.to_string().contains("Blob") && err.to_string().contains("307211 bytes"), "{err}");
    tx.commit().await.unwrap();
    assert_eq!(outbox.status().await.unwrap().pending, 0);

    let bad_prefix = fixture.outbox_config("svc").table_prefix("x\"; DROP TABLE users; --");
    let err = Outbox::new(fixture.pool.clone(), bad_prefix).unwrap_err();
    assert!(err.to_string().contains("outbox.table_prefix"), "{err}");
    let bad_relay = outbox.relay(Arc::new(InProcBus::new()), RelayConfig { batch_size: 0, ..RelayConfig::default() });
    assert!(bad_relay.err().unwrap().to_string().contains("relay.batch_size"));
    let retry = RetryPolicy::exponential(10, Duration::from_secs(60)).with_max_delay(Duration::from_secs(300));
    let short = InboxConfig { retention: Duration::from_secs(600), ..InboxConfig::default() };
    let err = Inbox::new(outbox.clone(), short, &retry).err().unwrap();
    assert!(err.to_string().contains("inbox.retention"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_recent_enough_for_millisecond_clock() {
    let fixture = sqlx::Sqlite::fixture().await;
    let version: String = sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&fixture.pool).await.unwrap();
    let now: i64 = sqlx::query_scalar("SELECT CAST(unixepoch('subsec') * 1000 AS INTEGER)")
        .fetch_one(&fixture.pool)
        .await
        .unwrap_or_else(|e| panic!("SQLite {version} lacks unixepoch('subsec'): {e}"));
    let app = chrono::Utc::now().timestamp_millis();
    assert!((now - app).abs() < 5_000, "SQLite {version} clock {now} vs {app}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_has_no_schemas() {
    let fixture = sqlx::Sqlite::fixture().await;
    let err = Outbox::new(fixture.pool.clone(), outbox::OutboxConfig::new("svc").schema("s")).unwrap_err();
    assert!(err.to_string().contains("outbox.schema"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_a_relay_in_another_process_long_before_its_poll() {
    let fixture = sqlx::Postgres::fixture().await;
    let producer = outbox(&fixture).await;
    // The relay's process: its own pool and outbox instance, so only NOTIFY can wake it; it polls every minute.
    let relay_side =
        Outbox::new(sqlx::Postgres::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::new();
    let handled_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let h = handled_at.clone();
    let _consumer = bus
        .subscribe(Subscription::new(GroupName::from_static("consumer")).on::<Numbered, _>(
            move |_e: Numbered, _ctx: DeliveryContext| {
                let handled_at = h.clone();
                async move {
                    handled_at.lock().unwrap().push(Instant::now());
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let poll = Duration::from_secs(60);
    let relay =
        relay_side.relay(Arc::new(bus.clone()), RelayConfig { poll_interval: poll, ..fast_relay() }).unwrap().spawn();
    relay.listening().await;
    // Let the relay finish its first (empty) claim and go to sleep on its poll.
    wait_until("the relay went idle", SETTLE, || async { relay.stats().batches == 0 }).await;

    let mut latencies = Vec::new();
    for seq in 0..5 {
        let committed_at = Instant::now();
        enqueue_committed(&producer, numbered("k", seq..seq + 1)).await;
        wait_until("the handler ran", Duration::from_secs(10), || async {
            handled_at.lock().unwrap().len() == seq as usize + 1
        })
        .await;
        let latency = *handled_at.lock().unwrap().last().unwrap() - committed_at;
        latencies.push(latency);
    }
    eprintln!("commit -> handled through NOTIFY: {latencies:?} (poll interval {poll:?})");
    for latency in latencies {
        assert!(latency < Duration::from_secs(5), "woken by NOTIFY, not by the 60 s poll: {latency:?}");
    }
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
struct FollowUp {
    of: u32,
}

impl bus_core::IntegrationEvent for FollowUp {
    const TYPE_NAME: &'static str = "FollowUp";
}

async fn events_a_handler_publishes_carry_correlation_and_causation_and_commit_with_it<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &bus.config().retry).unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = attempts.clone();
    // The first attempt publishes and then fails: its follow-up must vanish with the rollback.
    let _middle = bus
        .subscribe(Subscription::new(GroupName::from_static("middle")).on_inbox(
            &inbox,
            move |e: Numbered, mut tx: InboxTransaction<DB>| {
                let attempts = a.clone();
                async move {
                    tx.enqueue(&FollowUp { of: e.seq }).await?;
                    if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(HandlerError::transient("first attempt fails after publishing"));
                    }
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let received: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let r = received.clone();
    let _end = bus
        .subscribe(Subscription::new(GroupName::from_static("end")).on::<FollowUp, _>(
            move |_e: FollowUp, ctx: DeliveryContext| {
                let received = r.clone();
                async move {
                    received.lock().unwrap().push(ctx.envelope().clone());
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    let mut tx = outbox.begin().await.unwrap();
    let builder = Envelope::for_event(&Numbered { key: "k".into(), seq: 7 }).unwrap().correlation_id("request-42");
    let first = tx.enqueue_with(builder).await.unwrap();
    tx.commit().await.unwrap();
    wait_until("the follow-up arrived", SETTLE, || async { !received.lock().unwrap().is_empty() }).await;
    settle(&outbox, &bus).await;

    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "the rolled-back attempt's follow-up was never published: {received:?}");
    assert_eq!(received[0].causation_id(), Some(first));
    assert_eq!(received[0].correlation_id(), "request-42");
    assert_eq!(received[0].source(), Some("producer"));
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_replay_from_a_point_in_time_starts_at_the_first_event_enqueued_since<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (_consumer, _inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    enqueue_committed(&outbox, numbered("k", 0..3)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = enqueue_committed(&outbox, numbered("k", 3..5)).await;
    settle(&outbox, &bus).await;
    let from = outbox.seq_before(since).await.unwrap().expect("events were enqueued since");
    let replayed: Vec<uuid::Uuid> =
        outbox.published_events(from, i64::MAX, None, 100).await.unwrap().iter().map(|(_, e)| e.id()).collect();
    assert_eq!(replayed, later, "exactly the events enqueued since then, in order");
    assert_eq!(outbox.seq_before(chrono::Utc::now() + chrono::Duration::hours(1)).await.unwrap(), None);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_scheduled_event_is_published_when_due_and_holds_back_its_key<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let (consumer, _inbox) = inbox_consumer(&fixture, &outbox, &bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(800);
    let mut tx = outbox.begin().await.unwrap();
    tx.enqueue_at(&Numbered { key: "later".into(), seq: 0 }, due).await.unwrap();
    tx.enqueue(&Numbered { key: "later".into(), seq: 1 }).await.unwrap();
    tx.enqueue(&Numbered { key: "now".into(), seq: 0 }).await.unwrap();
    tx.commit().await.unwrap();
    wait_until("the unscheduled key delivered and marked", SETTLE, || async {
        consumer.seen.lock().unwrap().len() == 1 && outbox.status().await.unwrap().published == 1
    })
    .await;
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.scheduled), (2, 1), "{status:?}");
    assert!(status.oldest_pending_ms.unwrap_or(0) < 800, "a scheduled event is not counted as waiting: {status:?}");
    assert!(chrono::Utc::now() < due, "the test checked before the due time");
    settle(&outbox, &bus).await;
    assert!(chrono::Utc::now() >= due, "published only once due");
    let seen = consumer.seen.lock().unwrap().clone();
    assert_eq!(seen[1..], numbered("later", 0..2), "the scheduled event held back the later one of its key");
    assert_eq!(outbox.status().await.unwrap().scheduled, 0);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// A helper that writes through the handler's transaction (as a service's store functions do).
async fn record_through<DB: TestDb>(
    tx: &mut InboxTransaction<DB>,
    effects: &str,
    what: &str,
) -> Result<(), HandlerError> {
    DB::record_effect(tx, effects, what).await?;
    Ok(())
}

/// A helper that borrows the transaction, writes, and hands it to another helper: nested use.
async fn record_twice_through<DB: TestDb>(
    tx: &mut InboxTransaction<DB>,
    effects: &str,
    what: &str,
) -> Result<(), HandlerError> {
    DB::record_effect(&mut *tx, effects, &format!("{what}-outer")).await?;
    record_through(tx, effects, &format!("{what}-inner")).await
}

async fn a_handler_uses_its_inbox_transaction_in_helpers_one_after_the_other_without_waiting<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &RetryPolicy::default()).unwrap();
    let effects = fixture.effects.clone();
    // Today's old shape of this (`ctx.tx()` taken again while a helper held the guard) hung forever.
    let handler = inbox.handler(move |e: Numbered, mut tx: InboxTransaction<DB>| {
        let effects = effects.clone();
        async move {
            record_through(&mut tx, &effects, &format!("{}-a", e.seq)).await?;
            record_twice_through(&mut tx, &effects, &format!("{}-b", e.seq)).await?;
            DB::record_effect(&mut tx, &effects, &format!("{}-c", e.seq)).await?;
            tx.enqueue(&Numbered { key: "follow-up".into(), seq: e.seq }).await?;
            Ok(())
        }
    });
    let envelope = Arc::new(Envelope::for_event(&Numbered { key: "k".into(), seq: 7 }).unwrap().build().unwrap());
    let group = GroupName::new("consumer").unwrap();
    let handled = tokio::time::timeout(
        Duration::from_secs(10),
        handler.handle(bus_core::transport::delivery_context(envelope.clone(), 1, group.clone())),
    )
    .await
    .expect("using the inbox transaction several times in one handler must not hang");
    handled.expect("handled");
    let mut written = DB::effects(&fixture.pool, &fixture.effects).await;
    written.sort();
    assert_eq!(written, ["7-a", "7-b-inner", "7-b-outer", "7-c"], "every write committed with the inbox row");
    assert_eq!(outbox.status().await.unwrap().pending, 1, "the follow-up event committed with them");
    // And it is one handling: the same delivery again changes nothing.
    handler.handle(bus_core::transport::delivery_context(envelope, 2, group)).await.expect("duplicate");
    assert_eq!(DB::effects(&fixture.pool, &fixture.effects).await.len(), 4);
    assert_eq!((inbox.stats().handled, inbox.stats().duplicates), (1, 1));
}

async fn an_inbox_transaction_that_outlives_its_handler_fails_the_handling_at_once<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &RetryPolicy::default()).unwrap();
    let effects = fixture.effects.clone();
    let (escaped_tx, escaped_rx) = tokio::sync::oneshot::channel::<InboxTransaction<DB>>();
    let escaped_tx = Arc::new(Mutex::new(Some(escaped_tx)));
    let handler = inbox.handler(move |_e: Numbered, mut tx: InboxTransaction<DB>| {
        let (effects, escaped) = (effects.clone(), escaped_tx.clone());
        async move {
            DB::record_effect(&mut tx, &effects, "escaped").await?;
            // The transaction leaves the handler (as into a spawned task): nothing may commit, nothing may wait.
            let _ = escaped.lock().unwrap().take().expect("once").send(tx);
            Ok(())
        }
    });
    let envelope = Arc::new(Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap());
    let group = GroupName::new("consumer").unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        handler.handle(bus_core::transport::delivery_context(envelope, 1, group)),
    )
    .await
    .expect("a handler whose transaction escaped must not hang");
    let error = result.expect_err("the handling failed");
    assert!(!error.is_permanent(), "{error}");
    assert!(error.to_string().contains("outlived its handler"), "{error}");
    drop(escaped_rx.await.expect("the escaped transaction"));
    assert!(DB::effects(&fixture.pool, &fixture.effects).await.is_empty(), "the escaped write rolled back");
    assert_eq!(inbox.stats().failed, 1);
}

async fn enqueue_on_a_transaction_of_ones_own_wakes_the_relay_when_it_commits<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received: Arc<Mutex<Vec<u32>>> = Arc::default();
    let r = received.clone();
    let _consumer = bus
        .subscribe(Subscription::new(GroupName::from_static("consumer")).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let received = r.clone();
                async move {
                    received.lock().unwrap().push(e.seq);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    // The relay would only poll after a minute: a wake-up must bring it.
    let relay = outbox
        .relay(Arc::new(bus.clone()), RelayConfig { poll_interval: Duration::from_secs(60), ..fast_relay() })
        .unwrap()
        .spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 0..3 {
        let started = Instant::now();
        // The caller's own transaction, committed by the caller: `Outbox::committed` is never called.
        let mut tx = fixture.pool.begin().await.unwrap();
        outbox.enqueue(&mut *tx, &Numbered { key: "own".into(), seq }).await.unwrap();
        tx.commit().await.unwrap();
        wait_until("delivered after the commit", SETTLE, || async {
            received.lock().unwrap().len() == seq as usize + 1
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(5), "the relay was not woken: {:?}", started.elapsed());
    }
    // Outside any transaction too (the insert commits by itself).
    let started = Instant::now();
    let mut conn = fixture.pool.acquire().await.unwrap();
    outbox.enqueue(&mut *conn, &Numbered { key: "own".into(), seq: 3 }).await.unwrap();
    wait_until("delivered", SETTLE, || async { received.lock().unwrap().len() == 4 }).await;
    assert!(started.elapsed() < Duration::from_secs(5), "the relay was not woken: {:?}", started.elapsed());
    assert_eq!(*received.lock().unwrap(), [0, 1, 2, 3]);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// On a connection outside any transaction, enqueueing several events is still all or nothing: when the
/// database refuses one, the others are not left behind (a caller that retries would enqueue them twice).
async fn enqueue_on_a_bare_connection_writes_all_the_events_or_none<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let table = fixture.table("outbox");
    // The database refuses the events of key "refused".
    match <DB as sqlx::Database>::NAME {
        "PostgreSQL" => {
            let function = fixture.table("refuse");
            DB::execute(
                &fixture.pool,
                &format!(
                    "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS \
                     $$ BEGIN IF NEW.partition_key = 'refused' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$"
                ),
            )
            .await;
            DB::execute(
                &fixture.pool,
                &format!("CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()"),
            )
            .await;
        }
        _ => {
            DB::execute(
                &fixture.pool,
                &format!(
                    "CREATE TRIGGER refuse BEFORE INSERT ON {table} WHEN NEW.partition_key = 'refused' \
                     BEGIN SELECT RAISE(ABORT, 'refused'); END"
                ),
            )
            .await;
        }
    }
    let envelope = |key: &str| Envelope::for_event(&Numbered { key: key.into(), seq: 0 }).unwrap().build().unwrap();
    let mut conn = fixture.pool.acquire().await.unwrap();
    let refused = outbox.enqueue_envelopes(&mut *conn, &[envelope("accepted"), envelope("refused")]).await;
    assert!(refused.is_err(), "the database refused the second event");
    assert_eq!(outbox.status().await.unwrap().pending, 0, "the first event was left behind");
    outbox.enqueue_envelopes(&mut *conn, &[envelope("a"), envelope("b")]).await.unwrap();
    assert_eq!(outbox.status().await.unwrap().pending, 2);
}

/// A handling dropped half-way (the subscription's timeout) counts as failed, and rolls back: its retry runs.
async fn a_handling_cut_short_by_a_timeout_counts_as_failed_and_leaves_nothing<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &RetryPolicy::default()).unwrap();
    let effects = fixture.effects.clone();
    let hang = Arc::new(AtomicBool::new(true));
    let hanging = hang.clone();
    let handler = inbox.handler(move |_e: Numbered, mut tx: InboxTransaction<DB>| {
        let (effects, hang) = (effects.clone(), hanging.clone());
        async move {
            DB::record_effect(&mut tx, &effects, "handled").await?;
            if hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    });
    let envelope = Arc::new(Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap());
    let group = GroupName::new("consumer").unwrap();
    let delivery = || bus_core::transport::delivery_context(envelope.clone(), 1, group.clone());
    let cut_short = tokio::time::timeout(Duration::from_millis(200), handler.handle(delivery())).await;
    assert!(cut_short.is_err(), "the handler hangs until the timeout");
    assert_eq!((inbox.stats().handled, inbox.stats().failed), (0, 1), "{:?}", inbox.stats());
    hang.store(false, Ordering::SeqCst);
    handler.handle(delivery()).await.expect("the retry runs: nothing of the first handling stayed");
    assert_eq!(DB::effects(&fixture.pool, &fixture.effects).await, ["handled"]);
    assert_eq!((inbox.stats().handled, inbox.stats().failed), (1, 1));
}

/// A transaction begun by hand (a raw `BEGIN`, SQLite's `BEGIN IMMEDIATE`), which sqlx does not know of: the
/// events enqueued in it belong to it (rolled back with it), and enqueueing in it works.
async fn enqueue_inside_a_transaction_begun_by_hand_belongs_to_it<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let begin = if <DB as sqlx::Database>::NAME == "SQLite" { "BEGIN IMMEDIATE" } else { "BEGIN" };
    let envelopes =
        || [0, 1].map(|seq| Envelope::for_event(&Numbered { key: "k".into(), seq }).unwrap().build().unwrap());
    let mut conn = fixture.pool.acquire().await.unwrap();
    DB::execute_on(&mut conn, begin).await;
    outbox.enqueue(&mut *conn, &Numbered { key: "k".into(), seq: 0 }).await.expect("enqueue in a raw transaction");
    outbox.enqueue_envelopes(&mut *conn, &envelopes()).await.expect("several, in a raw transaction");
    DB::execute_on(&mut conn, "ROLLBACK").await;
    assert_eq!(outbox.status().await.unwrap().pending, 0, "the events outlived the rollback of their transaction");
    DB::execute_on(&mut conn, begin).await;
    outbox.enqueue_envelopes(&mut *conn, &envelopes()).await.unwrap();
    DB::execute_on(&mut conn, "COMMIT").await;
    assert_eq!(outbox.status().await.unwrap().pending, 2);
}

/// The in-process bus keeps its dead letters in the service's database (`DeadLetterTable`): a dead-lettered
/// event counts as done only once stored, the dead letter survives the bus (a crash of the process), and it is
/// listed and redriven from there. If it cannot be stored, the event is not confirmed: its publisher keeps it.
async fn in_process_dead_letters_are_kept_in_the_service_database_and_survive_a_crash<DB: TestDb>() {
    use bus_core::{DeadLetterCause, DeadLetterQueue};
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let group = GroupName::from_static("svc");
    let store = outbox::DeadLetterTable::new(outbox.clone());
    let healthy = Arc::new(AtomicBool::new(false));
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let subscription = |healthy: Arc<AtomicBool>, handled: Arc<Mutex<Vec<u32>>>| {
        Subscription::new(group.clone()).retry(RetryPolicy::no_retry()).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let (healthy, handled) = (healthy.clone(), handled.clone());
                async move {
                    if e.seq == 1 && !healthy.load(Ordering::SeqCst) {
                        return Err(HandlerError::permanent("cannot apply event 1"));
                    }
                    handled.lock().unwrap().push(e.seq);
                    Ok(())
                }
            },
        )
    };
    let first = InProcBus::new();
    first.keep_dead_letters(&group, store.clone());
    let _sub = first.subscribe(subscription(healthy.clone(), handled.clone())).await.unwrap();
    let events: Vec<Envelope> =
        numbered("k", 0..3).iter().map(|e| Envelope::for_event(e).unwrap().build().unwrap()).collect();
    for envelope in &events {
        first.publish_confirmed(envelope.clone()).await.expect("handled or dead-lettered, and stored");
    }
    assert_eq!(*handled.lock().unwrap(), vec![0, 2]);
    // The process dies: the bus and its memory are gone; the database is not.
    drop(_sub);
    drop(first);
    let second = InProcBus::new();
    second.keep_dead_letters(&group, store.clone());
    let letters = second.dead_letters(&group).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.envelope.as_ref().map(Envelope::id), Some(events[1].id()));
    assert_eq!(letter.envelope.as_ref().and_then(Envelope::partition_key), Some("k"));
    assert_eq!((letter.cause, letter.attempts), (DeadLetterCause::Permanent, 1));
    assert!(letter.last_error.contains("cannot apply event 1"), "{}", letter.last_error);
    // Fixed: redriven from the database, handled, gone.
    healthy.store(true, Ordering::SeqCst);
    let _sub = second.subscribe(subscription(healthy.clone(), handled.clone())).await.unwrap();
    assert_eq!(second.redrive(&group, None).await.unwrap(), 1);
    second.settled().await;
    assert_eq!(*handled.lock().unwrap(), vec![0, 2, 1]);
    wait_until("the redriven dead letter removed once handled", SETTLE, || async {
        second.dead_letters(&group).await.unwrap().is_empty()
    })
    .await;
    // A dead letter that cannot be stored is not confirmed.
    healthy.store(false, Ordering::SeqCst);
    DB::execute(&fixture.pool, &format!("DROP TABLE {}", fixture.table("dead_letters"))).await;
    let again = Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap();
    let refused = second.publish_confirmed(again).await;
    assert!(refused.is_err(), "not confirmed while the dead letter is not stored: {refused:?}");
    second.shutdown(Duration::from_secs(5)).await;
}

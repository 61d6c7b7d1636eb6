//! The relay under trouble, against real PostgreSQL and SQLite: a bus that goes down, events the bus refuses,
//! one key that keeps failing, relays that die or lose their rows. Each scenario runs on both databases.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bus_core::{
    BusError, Confirmation, DeliveryContext, Envelope, EventBus, GroupName, RetryPolicy, Subscription,
    SubscriptionHandle,
};
use bus_inproc::InProcBus;
use integration_tests::{Fixture, HangingBus, Numbered, TestDb, fast_relay, on_both_databases, wait_until};
use outbox::{Outbox, RelayConfig};

const SETTLE: Duration = Duration::from_secs(60);

on_both_databases!(
    a_bus_outage_longer_than_the_retry_schedule_fails_nothing_and_costs_no_attempt,
    a_permanent_error_fails_the_row_at_once,
    a_blocked_key_never_stalls_other_keys_and_its_failed_head_parks_it,
    a_failure_inside_a_batch_keeps_the_key_in_order,
    a_killed_relays_rows_are_taken_over_long_before_its_lease_ends,
    late_results_of_a_relay_that_lost_its_rows_change_nothing,
    a_row_that_keeps_killing_the_relay_becomes_failed,
    a_transport_error_that_keeps_striking_one_event_on_a_healthy_bus_spends_its_attempts,
    rows_leased_to_a_relay_that_lost_track_of_them_are_published_at_once,
    rows_whose_mark_was_lost_are_published_again,
);

async fn outbox<DB: TestDb>(fixture: &Fixture<DB>) -> Outbox<DB> {
    integration_tests::migrated_outbox(fixture).await
}

async fn enqueue<DB: TestDb>(outbox: &Outbox<DB>, events: impl IntoIterator<Item = Numbered>) {
    let mut tx = outbox.begin().await.expect("begin");
    for event in events {
        tx.enqueue(&event).await.expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

fn numbered(key: &str, range: std::ops::Range<u32>) -> Vec<Numbered> {
    range.map(|seq| Numbered { key: key.into(), seq }).collect()
}

/// What a test bus does with one event: `None` passes it to the real bus.
type Rule = Box<dyn FnMut(&Numbered) -> Option<BusError> + Send>;

/// An [`InProcBus`] behind a switch and a rule: while `down`, health fails and every publish fails as a
/// transport error would; otherwise `rule` may refuse an event with the error it returns (through its
/// confirmation, as a broker's nack or return arrives).
#[derive(Clone)]
struct ScriptedBus {
    inner: InProcBus,
    down: Arc<AtomicBool>,
    rule: Arc<Mutex<Rule>>,
    publishes: Arc<AtomicUsize>,
}

impl ScriptedBus {
    fn new(inner: &InProcBus) -> Self {
        Self {
            inner: inner.clone(),
            down: Arc::default(),
            rule: Arc::new(Mutex::new(Box::new(|_| None))),
            publishes: Arc::default(),
        }
    }

    fn rule(&self, rule: impl FnMut(&Numbered) -> Option<BusError> + Send + 'static) {
        *self.rule.lock().unwrap() = Box::new(rule);
    }
}

#[async_trait]
impl EventBus for ScriptedBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        self.publishes.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(BusError::Transport("connection refused (test)".into()));
        }
        let event: Numbered = serde_json::from_slice(envelope.payload()).expect("a Numbered event");
        if let Some(error) = (self.rule.lock().unwrap())(&event) {
            return Ok(Confirmation::failed(error));
        }
        self.inner.publish(envelope).await
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        self.inner.subscribe(subscription).await
    }

    async fn health(&self) -> Result<(), BusError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(BusError::Transport("connection refused (test)".into()));
        }
        self.inner.health().await
    }
}

/// A consumer that records every event it receives, per key, in arrival order.
struct Received {
    per_key: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    _handle: SubscriptionHandle,
}

impl Received {
    async fn subscribe(bus: &InProcBus) -> Self {
        let per_key: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
        let seen = per_key.clone();
        let handle = bus
            .subscribe(Subscription::new(GroupName::from_static("consumer")).concurrency(4).on::<Numbered, _>(
                move |e: Numbered, _ctx: DeliveryContext| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().entry(e.key).or_default().push(e.seq);
                        Ok(())
                    }
                },
            ))
            .await
            .expect("subscribe");
        Self { per_key, _handle: handle }
    }

    fn of(&self, key: &str) -> Vec<u32> {
        self.per_key.lock().unwrap().get(key).cloned().unwrap_or_default()
    }

    fn total(&self) -> usize {
        self.per_key.lock().unwrap().values().map(Vec::len).sum()
    }
}

/// The attempts recorded on every row, oldest first.
async fn attempts<DB: TestDb>(fixture: &Fixture<DB>) -> Vec<i64> {
    DB::integers(
        &fixture.pool,
        &format!("SELECT CAST(attempts AS BIGINT) FROM {} ORDER BY seq", fixture.table("outbox")),
    )
    .await
}

async fn a_bus_outage_longer_than_the_retry_schedule_fails_nothing_and_costs_no_attempt<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let scripted = ScriptedBus::new(&bus);
    scripted.down.store(true, Ordering::SeqCst);
    let relay = outbox.relay(Arc::new(scripted.clone()), fast_relay()).unwrap().spawn();
    enqueue(&outbox, numbered("a", 0..20).into_iter().chain(numbered("b", 0..20))).await;

    // The whole retry schedule (3 attempts, 20 ms then 40 ms apart) fits many times into this outage.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = outbox.status().await.unwrap();
    assert_eq!((status.pending, status.failed), (40, 0), "an outage turns nothing into failed: {status:?}");
    assert!(attempts(&fixture).await.iter().all(|&a| a == 0), "no attempt spent: {:?}", attempts(&fixture).await);
    let tried = scripted.publishes.load(Ordering::SeqCst);
    assert!(tried <= 200, "the relay waits for the bus to be healthy instead of hammering it: {tried} publishes");
    assert_eq!(relay.stats().gave_up, 0);

    let back = Instant::now();
    scripted.down.store(false, Ordering::SeqCst);
    wait_until("everything delivered once the bus is back", SETTLE, || async { received.total() == 40 }).await;
    let settled_in = back.elapsed();
    eprintln!("settled {settled_in:?} after the bus came back ({tried} publishes tried during the outage)");
    assert!(settled_in < Duration::from_secs(3), "the relay resumes at once: {settled_in:?}");
    assert_eq!(received.of("a"), (0..20).collect::<Vec<_>>());
    assert_eq!(received.of("b"), (0..20).collect::<Vec<_>>());
    wait_until("all marked", SETTLE, || async { outbox.status().await.unwrap().published == 40 }).await;
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_permanent_error_fails_the_row_at_once<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let scripted = ScriptedBus::new(&bus);
    scripted.rule(|e| {
        (e.key == "big").then(|| BusError::PayloadTooLarge {
            event_type: "Numbered".into(),
            size: 1 << 30,
            limit: 1 << 20,
        })
    });
    let relay = outbox.relay(Arc::new(scripted.clone()), fast_relay()).unwrap().spawn();
    enqueue(&outbox, numbered("big", 0..1).into_iter().chain(numbered("ok", 0..5))).await;
    wait_until("the refused row is failed", SETTLE, || async { outbox.status().await.unwrap().failed == 1 }).await;
    wait_until("the others delivered", SETTLE, || async { received.of("ok").len() == 5 }).await;

    let failed = outbox.failed(10).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].attempts, 1, "a permanent error is not retried: {failed:?}");
    assert!(failed[0].last_error.as_deref().unwrap_or("").contains("payload limit"), "{failed:?}");
    assert_eq!(relay.stats().publish_failures, 1);
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_blocked_key_never_stalls_other_keys_and_its_failed_head_parks_it<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let scripted = ScriptedBus::new(&bus);
    let broken = Arc::new(AtomicBool::new(true));
    let b = broken.clone();
    // The head of key "stuck" is refused (a broker nack while healthy: retryable) until the cause is fixed.
    scripted.rule(move |e| {
        (e.key == "stuck" && e.seq == 0 && b.load(Ordering::SeqCst))
            .then(|| BusError::Nacked { event_id: uuid::Uuid::nil(), reason: "test".into() })
    });
    // Claims of 10 rows; the key's 30 rows come first in the outbox; 2 attempts, 300 ms apart.
    let config = RelayConfig {
        batch_size: 10,
        retry: RetryPolicy::exponential(2, Duration::from_millis(300)).with_jitter(0.0),
        ..fast_relay()
    };
    let relay = outbox.relay(Arc::new(scripted.clone()), config).unwrap().spawn();
    enqueue(&outbox, numbered("stuck", 0..30)).await;
    let others = Instant::now();
    for key in 0..10 {
        enqueue(&outbox, numbered(&format!("other-{key}"), 0..10)).await;
    }
    wait_until("the other keys flow while one key is blocked", Duration::from_secs(10), || async {
        received.total() == 100
    })
    .await;
    let others_in = others.elapsed();
    eprintln!("100 events of 10 other keys delivered in {others_in:?} while key \"stuck\" was blocked");
    assert!(others_in < Duration::from_secs(3), "other keys were held back: {others_in:?}");

    wait_until("the head is failed", SETTLE, || async { outbox.status().await.unwrap().failed == 1 }).await;
    // Parked: nothing after the failed head goes out, however long we wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(received.of("stuck").is_empty(), "no later event of a parked key is published: {:?}", received.of("stuck"));
    let status = outbox.status().await.unwrap();
    assert_eq!((status.failed, status.pending, status.parked_keys), (1, 29, 1), "{status:?}");

    broken.store(false, Ordering::SeqCst);
    assert_eq!(outbox.retry_failed(None).await.unwrap(), 1);
    wait_until("the key drains", SETTLE, || async { received.of("stuck").len() == 30 }).await;
    assert_eq!(received.of("stuck"), (0..30).collect::<Vec<_>>(), "in order, each once");
    let status = outbox.status().await.unwrap();
    assert_eq!((status.failed, status.parked_keys), (0, 0));
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_failure_inside_a_batch_keeps_the_key_in_order<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let scripted = ScriptedBus::new(&bus);
    // Event 5 of key "k" and event 3 of key "j" are refused once each, in the middle of one batch.
    let mut refused = std::collections::HashSet::new();
    scripted.rule(move |e| {
        ((e.key == "k" && e.seq == 5) || (e.key == "j" && e.seq == 3))
            .then(|| refused.insert((e.key.clone(), e.seq)))
            .filter(|first| *first)
            .map(|_| BusError::Unroutable { event_type: "Numbered".into() })
    });
    let relay = outbox.relay(Arc::new(scripted.clone()), fast_relay()).unwrap().spawn();
    let mut events = Vec::new();
    for seq in 0..20 {
        events.push(Numbered { key: "k".into(), seq });
        events.push(Numbered { key: "j".into(), seq });
    }
    enqueue(&outbox, events).await;
    wait_until("all delivered", SETTLE, || async { received.total() == 40 }).await;
    assert_eq!(received.of("k"), (0..20).collect::<Vec<_>>(), "a retried event never lands after its successors");
    assert_eq!(received.of("j"), (0..20).collect::<Vec<_>>());
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// Passes publishes to the real bus but never answers their confirmations: the relay holds its rows.
struct WithholdingBus {
    inner: InProcBus,
    release: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl EventBus for WithholdingBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        let inner = self.inner.publish(envelope).await?;
        let release = self.release.clone();
        Ok(Confirmation::from_future(async move {
            inner.await?;
            release.notified().await;
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

async fn a_killed_relays_rows_are_taken_over_long_before_its_lease_ends<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    // The survivor works as another process would: its own pool and outbox instance.
    let other_process = Outbox::new(DB::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let long_lease = RelayConfig { lease: Duration::from_secs(30), ..fast_relay() };
    let withholding = WithholdingBus { inner: bus.clone(), release: Arc::default() };
    let doomed = outbox.relay(Arc::new(withholding), long_lease.clone()).unwrap().spawn();
    enqueue(&outbox, numbered("k", 0..50)).await;
    wait_until("the doomed relay holds the rows", SETTLE, || async { outbox.status().await.unwrap().in_flight == 50 })
        .await;
    bus.settled().await;
    let sent_by_the_doomed = received.of("k").len();
    let survivor = other_process.relay(Arc::new(bus.clone()), long_lease).unwrap().spawn();
    doomed.kill().await;
    let killed = Instant::now();
    wait_until("the survivor published them all", SETTLE, || async {
        other_process.status().await.unwrap().published == 50
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("rows of a killed relay (30 s lease) taken over in {takeover:?}");
    assert!(takeover < Duration::from_secs(5), "a dead relay's rows wait for its lease: {takeover:?}");
    // The doomed relay may still have got an event out between the count above and its kill: what matters is
    // that the survivor's 50 come last, all of them, in order.
    let survivors_fifty = || {
        let seen = received.of("k");
        seen.len() >= sent_by_the_doomed + 50 && seen[seen.len() - 50..] == (0..50).collect::<Vec<_>>()[..]
    };
    wait_until("delivered", SETTLE, || async { survivors_fifty() }).await;
    let seen = received.of("k");
    assert!(seen.len() <= sent_by_the_doomed + 51, "at most one more from the doomed relay: {seen:?}");
    survivor.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn late_results_of_a_relay_that_lost_its_rows_change_nothing<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let _received = Received::subscribe(&bus).await;
    let withholding = WithholdingBus { inner: bus.clone(), release: Arc::default() };
    let release = withholding.release.clone();
    // Renewals every 500 ms: the relay soon sees that the rows are no longer its own.
    let config = RelayConfig { lease: Duration::from_millis(1_500), ..fast_relay() };
    let slow = outbox.relay(Arc::new(withholding), config).unwrap().spawn();
    enqueue(&outbox, numbered("k", 0..10)).await;
    wait_until("the slow relay holds the rows", SETTLE, || async { outbox.status().await.unwrap().in_flight == 10 })
        .await;
    // Another relay took the rows over (as after an expired lease) and holds them now.
    let table = fixture.table("outbox");
    let other = "00000000-0000-7000-8000-000000000001";
    if fixture.schema.is_none() {
        // SQLite: the other relay's heartbeat says it is alive (PostgreSQL: the rows keep the slow relay's live lock).
        let relays = fixture.table("relays");
        DB::execute(
            &fixture.pool,
            &format!("INSERT INTO {relays} (id, heartbeat_at) VALUES ('{other}', {})", i64::MAX / 2),
        )
        .await;
    }
    // (with a lease of its own, as the other relay's renewals keep it)
    let until =
        if fixture.schema.is_some() { "now() + interval '1 hour'".to_owned() } else { format!("{}", i64::MAX / 2) };
    let taken =
        DB::execute(&fixture.pool, &format!("UPDATE {table} SET locked_by = '{other}', locked_until = {until}")).await;
    assert_eq!(taken, 10);
    let sent = bus.stats().published;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // The slow relay's confirmations arrive now: its marks must not touch rows it no longer owns, and it sends
    // none of the rows it had not sent yet (the other relay publishes them).
    release.notify_waiters();
    for _ in 0..50 {
        release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = outbox.status().await.unwrap();
    assert_eq!((status.published, status.pending), (0, 10), "a late result overwrote another relay's rows: {status:?}");
    let owners = DB::integers(
        &fixture.pool,
        &format!("SELECT count(*) FROM {table} WHERE locked_by = '{other}' AND status = 0"),
    )
    .await;
    assert_eq!(owners, vec![10]);
    assert_eq!(bus.stats().published, sent, "the rows taken over were not sent again by the slow relay");
    slow.kill().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_row_that_keeps_killing_the_relay_becomes_failed<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    enqueue(&outbox, numbered("k", 0..1)).await;
    // Three relays in turn claim the row and die on it (max_attempts is 3).
    for round in 1..=3 {
        let relay = outbox.relay(Arc::new(HangingBus), fast_relay()).unwrap().spawn();
        // Each claim counts as an attempt.
        wait_until("claimed once more", SETTLE, || async { attempts(&fixture).await == vec![round] }).await;
        relay.kill().await;
    }
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    wait_until("the row is failed", SETTLE, || async { outbox.status().await.unwrap().failed == 1 }).await;
    let failed = outbox.failed(10).await.unwrap();
    assert!(failed[0].last_error.as_deref().unwrap_or("").contains("without an outcome"), "{failed:?}");
    assert_eq!(received.total(), 0, "the row that killed three relays is not tried a fourth time");
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn a_transport_error_that_keeps_striking_one_event_on_a_healthy_bus_spends_its_attempts<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let scripted = ScriptedBus::new(&bus);
    // As a broker that closes the channel on one message (over its size limit) while it is otherwise healthy.
    scripted.rule(|e| (e.key == "poison").then(|| BusError::Transport("channel closed by the broker (test)".into())));
    let relay = outbox.relay(Arc::new(scripted.clone()), fast_relay()).unwrap().spawn();
    enqueue(&outbox, numbered("poison", 0..1).into_iter().chain(numbered("ok", 0..10))).await;
    wait_until("the others delivered", SETTLE, || async { received.of("ok").len() == 10 }).await;
    wait_until("the poison event is failed, not retried forever", SETTLE, || async {
        outbox.status().await.unwrap().failed == 1
    })
    .await;
    let failed = outbox.failed(10).await.unwrap();
    assert_eq!(failed[0].attempts, 3, "{failed:?}");
    assert!(failed[0].last_error.as_deref().unwrap_or("").contains("while the bus was healthy"), "{failed:?}");
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

async fn rows_leased_to_a_relay_that_lost_track_of_them_are_published_at_once<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let config = RelayConfig { lease: Duration::from_secs(30), ..fast_relay() };
    let relay = outbox.relay(Arc::new(bus.clone()), config).unwrap();
    enqueue(&outbox, numbered("k", 0..10)).await;
    // The rows are leased to this relay for 30 s, but it holds none of them (a claim whose answer was lost).
    let table = fixture.table("outbox");
    let until =
        if fixture.schema.is_some() { "now() + interval '30 seconds'".to_owned() } else { format!("{}", i64::MAX / 2) };
    DB::execute(&fixture.pool, &format!("UPDATE {table} SET locked_by = '{}', locked_until = {until}", relay.id()))
        .await;
    let started = Instant::now();
    let relay = relay.spawn();
    wait_until("delivered", SETTLE, || async { received.of("k").len() == 10 }).await;
    assert!(started.elapsed() < Duration::from_secs(5), "they waited for the lease: {:?}", started.elapsed());
    assert_eq!(received.of("k"), (0..10).collect::<Vec<_>>());
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// SQLite: a relay that is alive keeps its rows however late its writes are. On a loaded machine a write waits
/// seconds behind others' write locks; here the liveness table is made to say every relay fell silent a minute
/// ago, over and over, and the other relay must still leave the rows alone (no event is published twice). Its
/// death alone frees them, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_live_relay_keeps_its_rows_however_late_its_writes_are() {
    let fixture = sqlx::Sqlite::fixture().await;
    let other_pool = sqlx::Sqlite::second_pool(&fixture).await;
    a_live_relay_keeps_its_rows(&fixture, other_pool).await;
}

/// SQLite: relays agree on who is alive whatever URL names their database: here the other relay opens it as a
/// `file:` URI, which is no path of the file system (it used to take the holder for dead at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_relays_agree_on_liveness_whatever_url_names_the_database() {
    let fixture = sqlx::Sqlite::fixture().await;
    let path: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(&fixture.pool)
        .await
        .unwrap();
    let options: sqlx::sqlite::SqliteConnectOptions = format!("sqlite:file:{path}?mode=rw").parse().unwrap();
    let other_pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options.busy_timeout(Duration::from_secs(10)))
        .await
        .unwrap();
    a_live_relay_keeps_its_rows(&fixture, other_pool).await;
}

async fn a_live_relay_keeps_its_rows(fixture: &Fixture<sqlx::Sqlite>, other_pool: sqlx::SqlitePool) {
    let outbox = outbox(fixture).await;
    let other_process = Outbox::new(other_pool, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let long_lease = RelayConfig { lease: Duration::from_secs(30), ..fast_relay() };
    let withholding = WithholdingBus { inner: bus.clone(), release: Arc::default() };
    let holder = outbox.relay(Arc::new(withholding), long_lease.clone()).unwrap().spawn();
    enqueue(&outbox, numbered("k", 0..20)).await;
    wait_until("the holder holds the rows", SETTLE, || async { outbox.status().await.unwrap().in_flight == 20 }).await;
    // Its first event is out (unconfirmed: the rest of the key waits behind it). The claim commits before the
    // relay sends what it claimed: count once it did.
    wait_until("the holder sent its first event", SETTLE, || async { received.of("k") == [0] }).await;
    bus.settled().await;
    let sent_by_the_holder = received.total();
    let other = other_process.relay(Arc::new(bus.clone()), long_lease).unwrap().spawn();
    let relays = fixture.table("relays");
    let silent = Instant::now();
    while silent.elapsed() < Duration::from_secs(4) {
        sqlx::Sqlite::execute(
            &fixture.pool,
            &format!("UPDATE {relays} SET heartbeat_at = CAST(unixepoch('subsec') * 1000 AS INTEGER) - 60000"),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.settled().await;
    assert_eq!(
        received.total(),
        sent_by_the_holder,
        "the other relay took the rows of a live relay and sent them again: {:?} after {sent_by_the_holder}",
        received.of("k")
    );
    assert_eq!(other_process.status().await.unwrap().published, 0);
    holder.kill().await;
    let killed = Instant::now();
    wait_until("the other relay published them all", SETTLE, || async {
        other_process.status().await.unwrap().published == 20
    })
    .await;
    assert!(killed.elapsed() < Duration::from_secs(3), "a dead relay's rows waited: {:?}", killed.elapsed());
    other.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// SQLite stores ids as text: a row another tool wrote with a bad id fails alone, with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_row_that_cannot_be_read_back_fails_alone() {
    let fixture = sqlx::Sqlite::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    enqueue(&outbox, numbered("a", 0..1)).await;
    let table = fixture.table("outbox");
    sqlx::Sqlite::execute(&fixture.pool, &format!("UPDATE {table} SET event_id = 'not-a-uuid'")).await;
    enqueue(&outbox, numbered("b", 0..5)).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    wait_until("the others delivered", SETTLE, || async { received.of("b").len() == 5 }).await;
    wait_until("the bad row is failed", SETTLE, || async { outbox.status().await.unwrap().failed == 1 }).await;
    // Delivered comes before marked: wait for the marks.
    wait_until("the others marked", SETTLE, || async { outbox.status().await.unwrap().pending == 0 }).await;
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// A NOTIFY channel name longer than PostgreSQL's 63 bytes (a long schema and table prefix) is hashed to fit:
/// a relay in another process is still woken by NOTIFY, not by its one-minute poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_long_notify_channel_still_wakes_relays_in_other_processes() {
    let fixture = sqlx::Postgres::fixture().await;
    let config = || fixture.outbox_config("producer").table_prefix(format!("{}_", "p".repeat(39)));
    let producer = Outbox::new(fixture.pool.clone(), config()).unwrap();
    producer.migrate().await.unwrap();
    let relay_side = Outbox::new(sqlx::Postgres::second_pool(&fixture).await, config()).unwrap();
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let relay = relay_side
        .relay(Arc::new(bus.clone()), RelayConfig { poll_interval: Duration::from_secs(60), ..fast_relay() })
        .unwrap()
        .spawn();
    relay.listening().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let committed = Instant::now();
    enqueue(&producer, numbered("k", 0..1)).await;
    wait_until("woken by NOTIFY", Duration::from_secs(10), || async { received.of("k").len() == 1 }).await;
    assert!(committed.elapsed() < Duration::from_secs(5), "woken by its poll: {:?}", committed.elapsed());
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

// Direct dispatch (PostgreSQL): a committing producer hands its rows to its process's relay, without a claim.

/// Enqueues keyless warm-up events until `relay` takes one directly (its liveness proof is ready and it
/// offered itself); returns how many rows it took directly by then.
async fn until_direct(outbox: &Outbox<sqlx::Postgres>, relay: &outbox::RelayHandle) -> u64 {
    let deadline = Instant::now() + SETTLE;
    for attempt in 0.. {
        let before = relay.stats().handed_off;
        // A key of its own each time: an earlier warm-up still in flight must not hold it back.
        enqueue(outbox, [Numbered { key: format!("warm-up-{attempt}"), seq: 0 }]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let after = relay.stats().handed_off;
        if after > before {
            return after;
        }
        assert!(Instant::now() < deadline, "the relay never took a row directly");
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_committed_event_goes_to_the_relay_without_a_claim_and_a_burst_keeps_key_order() {
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    // It polls once a minute: only a wake-up or a hand-off moves an event.
    let config = RelayConfig { poll_interval: Duration::from_secs(60), ..fast_relay() };
    let relay = outbox.relay(Arc::new(bus.clone()), config).unwrap().spawn();
    let warm = until_direct(&outbox, &relay).await;
    // One transaction per round, ten keys; each round once the previous one is published: every row is its
    // key's head, so every row goes direct.
    for round in 0..10 {
        enqueue(&outbox, (0..10).map(|k| Numbered { key: format!("k{k}"), seq: round })).await;
        wait_until("the round is published", SETTLE, || async { outbox.status().await.unwrap().pending == 0 }).await;
    }
    assert_eq!(relay.stats().handed_off - warm, 100, "every head row was handed over, none claimed");
    // A burst: most rows find an earlier row of their key still pending and take the claim; order holds anyway.
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                for round in 0..25 {
                    let events = (0..10).map(|k| Numbered { key: format!("p{p}-k{k}"), seq: round });
                    enqueue(&outbox, events).await;
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.unwrap();
    }
    wait_until("the burst is delivered", SETTLE, || async {
        (0..4).all(|p| (0..10).all(|k| received.of(&format!("p{p}-k{k}")).len() >= 25))
    })
    .await;
    for p in 0..4 {
        for k in 0..10 {
            assert_eq!(received.of(&format!("p{p}-k{k}")), (0..25).collect::<Vec<_>>(), "key p{p}-k{k}");
        }
    }
    for k in 0..10 {
        assert_eq!(received.of(&format!("k{k}")), (0..10).collect::<Vec<_>>(), "key k{k}");
    }
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_key_with_earlier_rows_in_another_process_takes_the_claim_and_keeps_its_order() {
    let fixture = sqlx::Postgres::fixture().await;
    let first = outbox(&fixture).await;
    let second = Outbox::new(sqlx::Postgres::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let config = RelayConfig { lease: Duration::from_secs(30), ..fast_relay() };
    // The first process's relay publishes but gets no confirmation until released.
    let withholding = WithholdingBus { inner: bus.clone(), release: Arc::default() };
    let release = withholding.release.clone();
    let first_relay = first.relay(Arc::new(withholding), config.clone()).unwrap().spawn();
    let second_relay = second.relay(Arc::new(bus.clone()), config).unwrap();
    let second_id = second_relay.id();
    let second_relay = second_relay.spawn();
    let first_warm = until_direct(&first, &first_relay).await;
    until_direct(&second, &second_relay).await;
    // A warm-up the second relay took by its claim may still be handed over late: count once that is over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_warm = second_relay.stats().handed_off;

    enqueue(&first, numbered("k", 0..5)).await;
    // (At least: a warm-up the relay claimed first may still be handed over late, and then ignored, or counted.)
    wait_until("k 0..5 went direct", SETTLE, || async { first_relay.stats().handed_off >= first_warm + 5 }).await;
    // One event of a key with the bus at a time: k 0 is out, unconfirmed; k 1..5 wait behind it in the relay.
    wait_until("the first relay published k 0", SETTLE, || async { received.of("k") == [0] }).await;
    // The second process writes the key's next rows while the first relay still holds its rows: they are not its
    // key's head, so they wait for the claim, which waits for the first relay's rows.
    enqueue(&second, numbered("k", 5..10)).await;
    enqueue(&second, numbered("other", 0..3)).await;
    wait_until("another key goes direct meanwhile", SETTLE, || async { received.of("other") == [0, 1, 2] }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.of("k"), [0], "nothing of k overtook the rows the first relay holds");
    // The rows of k the second process wrote were not leased to its relay, and its claim cannot take them (the
    // first relay's claim may: it holds the key's earlier rows, and publishes the rest after them).
    let table = fixture.table("outbox");
    let leased = sqlx::Postgres::integers(
        &fixture.pool,
        &format!("SELECT count(*) FROM {table} WHERE partition_key = 'k' AND locked_by = '{second_id}'"),
    )
    .await;
    assert_eq!(leased, [0], "no row of k went to the second relay");
    // "other" went direct (all of it, unless a claim of the second relay took a row before its hand-off came).
    assert!(second_relay.stats().handed_off - second_warm <= 3);

    wait_until("k delivered", SETTLE, || async {
        // Confirm whatever the first relay has out now (each of its keys' next events comes once confirmed).
        release.notify_waiters();
        received.of("k").len() >= 10
    })
    .await;
    assert_eq!(received.of("k"), (0..10).collect::<Vec<_>>(), "k in order, once each");
    // Confirm what is still out (a confirmation not yet waiting when last released) while the relay stops.
    let releasing = tokio::spawn(async move {
        loop {
            release.notify_waiters();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    first_relay.shutdown().await;
    releasing.abort();
    second_relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_handed_to_a_relay_that_is_killed_are_published_by_another_process_at_once() {
    let fixture = sqlx::Postgres::fixture().await;
    let doomed_side = outbox(&fixture).await;
    let survivor_side =
        Outbox::new(sqlx::Postgres::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap();
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let long_lease = RelayConfig { lease: Duration::from_secs(30), ..fast_relay() };
    let withholding = WithholdingBus { inner: bus.clone(), release: Arc::default() };
    let doomed = doomed_side.relay(Arc::new(withholding), long_lease.clone()).unwrap().spawn();
    let warm = until_direct(&doomed_side, &doomed).await;
    enqueue(&doomed_side, numbered("k", 0..50)).await;
    wait_until("the doomed relay took the rows directly", SETTLE, || async { doomed.stats().handed_off - warm == 50 })
        .await;
    let survivor = survivor_side.relay(Arc::new(bus.clone()), long_lease).unwrap().spawn();
    doomed.kill().await;
    let killed = Instant::now();
    wait_until("the survivor published them all", SETTLE, || async {
        survivor_side.status().await.unwrap().pending == 0
    })
    .await;
    let takeover = killed.elapsed();
    assert!(takeover < Duration::from_secs(5), "rows handed to a dead relay waited for its lease: {takeover:?}");
    wait_until("delivered", SETTLE, || async {
        let seen = received.of("k");
        seen.len() >= 50 && seen[seen.len() - 50..] == (0..50).collect::<Vec<_>>()[..]
    })
    .await;
    survivor.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_processes_writing_the_same_keys_publish_each_event_once_in_key_order() {
    const KEYS: usize = 12;
    const PRODUCERS: usize = 4;
    const PER_PRODUCER: usize = 60;
    let fixture = sqlx::Postgres::fixture().await;
    let sides = [
        outbox(&fixture).await,
        Outbox::new(sqlx::Postgres::second_pool(&fixture).await, fixture.outbox_config("producer")).unwrap(),
    ];
    // The business rows the producers serialize on: one counter per key.
    let counters = fixture.table("counters");
    sqlx::Postgres::execute(&fixture.pool, &format!("CREATE TABLE {counters} (key TEXT PRIMARY KEY, n INT NOT NULL)"))
        .await;
    for k in 0..KEYS {
        sqlx::Postgres::execute(&fixture.pool, &format!("INSERT INTO {counters} VALUES ('k{k}', 0)")).await;
    }
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let relays: Vec<_> = sides
        .iter()
        .map(|side| side.relay(Arc::new(bus.clone()), RelayConfig { lease: Duration::from_secs(10), ..fast_relay() }))
        .map(|relay| relay.unwrap().spawn())
        .collect();
    let mut warm = Vec::new();
    for (side, relay) in sides.iter().zip(&relays) {
        warm.push(until_direct(side, relay).await);
    }
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS * 2 {
        let (outbox, counters) = (sides[p % 2].clone(), counters.clone());
        producers.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(p as u64);
            for _ in 0..PER_PRODUCER {
                let key = format!("k{}", rng.usize(0..KEYS));
                let mut tx = outbox.begin().await.unwrap();
                // The business change first: a transaction on the same key waits for this one's commit.
                let n: i32 = sqlx::query_scalar(&format!("UPDATE {counters} SET n = n + 1 WHERE key = $1 RETURNING n"))
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                tx.enqueue(&Numbered { key, seq: n as u32 }).await.unwrap();
                tx.commit().await.unwrap();
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    let total = PRODUCERS * 2 * PER_PRODUCER;
    wait_until("every event delivered", SETTLE, || async {
        (0..KEYS).map(|k| received.of(&format!("k{k}")).len()).sum::<usize>() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut delivered = 0;
    for k in 0..KEYS {
        let seen = received.of(&format!("k{k}"));
        delivered += seen.len();
        assert_eq!(seen, (1..=seen.len() as u32).collect::<Vec<_>>(), "key k{k}: once each, in order");
    }
    assert_eq!(delivered, total, "nothing lost, nothing twice");
    for (i, relay) in relays.iter().enumerate() {
        let direct = relay.stats().handed_off - warm[i];
        eprintln!("relay {i}: {direct} rows handed over directly, {} published", relay.stats().published);
        assert!(direct > 0, "relay {i} took no row directly");
    }
    for relay in relays {
        relay.shutdown().await;
    }
    bus.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_event_of_an_aborted_transaction_or_a_rolled_back_savepoint_is_never_handed_over() {
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    until_direct(&outbox, &relay).await;
    // A statement fails and the caller goes on: PostgreSQL answers the COMMIT with a rollback, and no error.
    let mut tx = outbox.begin().await.unwrap();
    tx.enqueue(&Numbered { key: "aborted".into(), seq: 0 }).await.unwrap();
    let _ = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await;
    let _ = tx.commit().await;
    // One of the outbox's own inserts fails (the caller ignores the error): the transaction is aborted, and the
    // row leased before it must not be handed over either.
    let table = fixture.table("outbox");
    sqlx::query(&format!("ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (partition_key <> 'poison')"))
        .execute(&fixture.pool)
        .await
        .unwrap();
    let mut tx = outbox.begin().await.unwrap();
    tx.enqueue(&Numbered { key: "before-failure".into(), seq: 0 }).await.unwrap();
    assert!(tx.enqueue(&Numbered { key: "poison".into(), seq: 0 }).await.is_err(), "the CHECK refuses it");
    let _ = tx.commit().await;
    // A savepoint rolled back takes its event with it; the one after it stays.
    let mut tx = outbox.begin().await.unwrap();
    sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
    tx.enqueue(&Numbered { key: "undone".into(), seq: 0 }).await.unwrap();
    sqlx::query("ROLLBACK TO SAVEPOINT s").execute(&mut *tx).await.unwrap();
    tx.enqueue(&Numbered { key: "kept".into(), seq: 0 }).await.unwrap();
    tx.commit().await.unwrap();
    wait_until("the kept event delivered", SETTLE, || async { received.of("kept") == [0] }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(received.of("aborted").is_empty(), "an event of a rolled-back transaction was published");
    assert!(received.of("undone").is_empty(), "an event of a rolled-back savepoint was published");
    assert!(
        received.of("before-failure").is_empty(),
        "an event of a transaction aborted by a failed enqueue was published"
    );
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// A database crash can lose the relay's last marks (its writes commit asynchronously): the rows are pending again
/// and must be published again (a duplicate the inboxes drop), never left pending because the relay remembers
/// publishing them.
async fn rows_whose_mark_was_lost_are_published_again<DB: TestDb>() {
    let fixture = DB::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let received = Received::subscribe(&bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    enqueue(&outbox, numbered("k", 0..5)).await;
    wait_until("published and marked", SETTLE, || async { outbox.status().await.unwrap().published == 5 }).await;
    // As after a crash that lost the marks: pending again, leased to nobody.
    let table = fixture.table("outbox");
    DB::execute(&fixture.pool, &format!("UPDATE {table} SET status = 0, published_at = NULL, locked_by = NULL")).await;
    outbox.committed();
    wait_until("published again", SETTLE, || async { outbox.status().await.unwrap().published == 5 }).await;
    wait_until("delivered again", SETTLE, || async { received.of("k").len() == 10 }).await;
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// A backlog that built up faster than PostgreSQL's statistics (a broker outage, a bulk import: the table's
/// figures still say it is nearly empty) is claimed head first: the claim reads the rows it takes, not the whole
/// backlog. (With the planner's own choice on such stale figures, a claim on 100,000 pending rows of 100 keys
/// walked every row and each of its key's earlier rows: 40 s per claim here, the relay stalled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_backlog_larger_than_the_tables_statistics_know_is_claimed_at_once() {
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = outbox(&fixture).await;
    enqueue(&outbox, numbered("k", 0..1)).await;
    let table = fixture.table("outbox");
    // No autovacuum may catch up with the statistics while the test runs.
    sqlx::query(&format!("ALTER TABLE {table} SET (autovacuum_enabled = off)")).execute(&fixture.pool).await.unwrap();
    // 100,000 copies of that event over 100 keys, in one statement: no autovacuum has looked at them yet.
    sqlx::query(&format!(
        "INSERT INTO {table} (event_id, event_type, version, occurred_at, correlation_id, partition_key, source, \
         payload) SELECT gen_random_uuid(), event_type, version, occurred_at, correlation_id, 'k' || (g % 100), \
         source, payload FROM {table}, generate_series(1, 100000) g"
    ))
    .execute(&fixture.pool)
    .await
    .unwrap();
    let bus = InProcBus::new();
    let _received = Received::subscribe(&bus).await;
    let relay = outbox.relay(Arc::new(bus.clone()), fast_relay()).unwrap().spawn();
    wait_until("the first batch of the backlog is published", Duration::from_secs(10), || async {
        relay.stats().published > 0
    })
    .await;
    relay.shutdown().await;
    bus.shutdown(Duration::from_secs(5)).await;
}

/// A relay told to stop while its claim is still running gives the rows that claim returns back at once and
/// stops: it used to sleep until its next lease renewal (a third of the lease: 10 s by default) with those
/// releases unwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_relay_stopped_while_it_claims_stops_at_once() {
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = outbox(&fixture).await;
    let bus = InProcBus::new();
    let _received = Received::subscribe(&bus).await;
    // A stopping relay that slept would sleep until its next renewal: a third of the lease, 20 s here.
    let config = RelayConfig { lease: Duration::from_secs(60), batch_size: 5_000, ..fast_relay() };
    for round in 0..5 {
        // A fresh backlog each round, over 100 keys (one key's long backlog makes a claim slow by itself): the
        // claim of a few thousand rows is still running when the stop comes.
        enqueue(&outbox, (0..100).flat_map(|k| numbered(&format!("round-{round}-{k}"), 0..50))).await;
        let relay = outbox.relay(Arc::new(bus.clone()), config.clone()).unwrap().spawn();
        relay.listening().await;
        let stopping = Instant::now();
        relay.shutdown().await;
        assert!(stopping.elapsed() < Duration::from_secs(10), "round {round}: stopping took {:?}", stopping.elapsed());
    }
    bus.shutdown(Duration::from_secs(5)).await;
}

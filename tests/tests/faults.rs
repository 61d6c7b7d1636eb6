//! The fault-injection suite: the sample services as real processes (PostgreSQL + RabbitMQ), a burst of orders,
//! one fault in the middle of it, then a [`Ledger`] line that accounts for every order and event (lost,
//! duplicate effects, reordered per key, dead letters) and the CONTRACT's invariants.
//!
//! Some scenarios stop or restart the broker or PostgreSQL for everybody: this is its own test binary (Cargo
//! runs test binaries one at a time) and its scenarios run one at a time. With nextest, the `serial-services`
//! test group in `.config/nextest.toml` does the same.
//!
//! Knobs: `FAULT_ORDERS` (orders per scenario, default 150), `FAULT_SEED` (when the fault strikes; printed on
//! every ledger line so a run can be repeated). Full run: `FAULT_ORDERS=1000 cargo test -p integration-tests
//! --test faults -- --nocapture --test-threads 1`. Ledger lines also go to `target/tmp/fault-ledger.log`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bus_core::EventBus;
use integration_tests::shop::{Ledger, Shop};
use integration_tests::{database_url, plain_amqp, rabbit_bus};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use outbox::{Outbox, OutboxConfig};
use samples::Service;
use samples::demo::{place_orders, seed};
use samples::faults::TransientFaults;
use tokio::sync::Mutex;
use uuid::Uuid;

/// One scenario at a time: some break shared services.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shop-service"))
}

fn orders() -> usize {
    std::env::var("FAULT_ORDERS").ok().and_then(|v| v.parse().ok()).unwrap_or(150)
}

fn fault_seed() -> u64 {
    std::env::var("FAULT_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| fastrand::u64(..))
}

/// A scenario: a fresh shop (with `extra_env` on one service's first start), seeded; a burst of [`orders`] in
/// the background; once a seeded 20–60 % of them are placed, `fault` runs; then the burst finishes, the shop
/// settles and the ledger is checked. `inspect` may add figures and expectations to the ledger.
async fn scenario<F, I>(name: &str, extra_env: &[(Service, &str, &str)], fault: F, inspect: I)
where
    F: AsyncFnOnce(&mut Shop),
    I: AsyncFnOnce(&Shop, &mut Ledger),
{
    scenario_on(name, Launch::Processes(extra_env), fault, inspect).await;
}

/// How a scenario's shop runs.
enum Launch<'a> {
    /// Each service its own process on RabbitMQ, with `extra_env` on one service's first start.
    Processes(&'a [(Service, &'a str, &'a str)]),
    /// Both services in the test process on the in-process bus ([`Shop::embedded`]).
    Embedded(Box<(samples::host::ServiceOptions, bus_inproc::InProcConfig)>),
}

/// [`scenario`] on a shop launched as `launch` says.
async fn scenario_on<F, I>(name: &str, launch: Launch<'_>, fault: F, inspect: I)
where
    F: AsyncFnOnce(&mut Shop),
    I: AsyncFnOnce(&Shop, &mut Ledger),
{
    let _only_me = SERIAL.lock().await;
    integration_tests::init_tracing();
    let (n, seed_value) = (orders(), fault_seed());
    let mut rng = fastrand::Rng::with_seed(seed_value);
    let fault_at = n * rng.usize(20..=60) / 100;
    let mut shop = match launch {
        Launch::Processes(extra_env) => Shop::start(binary(), extra_env).await,
        Launch::Embedded(settings) => Shop::embedded(settings.0, settings.1).await,
    };
    let client = shop.client();
    let initial = seed(&client).await.expect("seeded");
    let products: Vec<Uuid> = initial.keys().copied().collect();

    let placed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let burst = {
        let (client, placed) = (client.clone(), placed.clone());
        tokio::spawn(async move {
            place_orders(&client, &products, n, 8, Duration::from_secs(120), || {
                placed.fetch_add(1, Ordering::Relaxed);
            })
            .await
        })
    };
    // A fault may also strike by itself (a failpoint): then it is handled at once.
    while placed.load(Ordering::Relaxed) < fault_at && !burst.is_finished() && !shop.any_exited() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    fault(&mut shop).await;
    let placed_orders = burst.await.expect("burst task").expect("every order placed (retried through the fault)");
    assert_eq!(placed_orders.orders, n);
    let mut ledger = shop.settled_ledger(name, &initial).await;
    let elapsed = started.elapsed().as_secs_f64();
    ledger.extra.push(format!("seed={seed_value} fault_at_order={fault_at}"));
    ledger.extra.push(format!("events_per_s={:.0}", ledger.events as f64 / elapsed));
    inspect(&shop, &mut ledger).await;
    let violations = shop.client().invariant_violations(&initial).await.expect("invariants readable");
    let dead_letter_violations = violations.iter().filter(|v| !v.contains("bus_dead_lettered_total")).count();
    // `<target>/tmp/fault-ledger.log`: the lines survive cargo's capture of passing tests' output.
    ledger.check(Some(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("fault-ledger.log")));
    assert_eq!(ledger.orders, n, "one order per placed order (retries with the same key included)");
    if ledger.expected_dead_letters == 0 {
        assert!(violations.is_empty(), "invariants: {violations:?}");
    } else {
        assert_eq!(dead_letter_violations, 0, "invariants: {violations:?}");
        shop.purge_dead_letters().await;
    }
    shop.teardown().await;
}

async fn nothing(_: &Shop, _: &mut Ledger) {}

/// `kill -9` of `service` in the middle of the burst, and a restart half a second later.
async fn kill_and_restart(name: &str, service: Service) {
    scenario(
        name,
        &[],
        async move |shop: &mut Shop| {
            shop.kill(service).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            shop.restart(service).await;
        },
        nothing,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_catalog_mid_burst() {
    kill_and_restart("kill-catalog", Service::Catalog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_ordering_mid_burst() {
    kill_and_restart("kill-ordering", Service::Ordering).await;
}

/// The ordering service aborts (failpoint) after the broker confirmed a relay batch and before the relay marked
/// it: after the restart those events are published again, and the catalog's inbox must skip every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_crash_between_confirm_and_mark() {
    scenario(
        "relay-crash-after-confirm",
        &[(Service::Ordering, "BUS_FAILPOINT", "relay-after-confirm@5")],
        async |shop: &mut Shop| {
            let process = shop.ordering.process.as_mut().expect("ordering running");
            assert!(process.exited_within(Duration::from_secs(60)).await, "the failpoint aborted the ordering service");
            shop.restart(Service::Ordering).await;
        },
        async |_: &Shop, ledger: &mut Ledger| {
            assert!(ledger.duplicates_skipped > 0, "the republished batch reached the catalog's inbox: {ledger}");
        },
    )
    .await;
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("this scenario needs rabbitmqctl on the host, for the broker under test ({e})"));
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_connections_closed_then_broker_restarted() {
    scenario(
        "broker-restart",
        &[],
        async |_: &mut Shop| {
            tokio::task::spawn_blocking(|| {
                rabbitmqctl(&["close_all_connections", "fault injection"]);
                std::thread::sleep(Duration::from_secs(1));
                rabbitmqctl(&["stop_app"]);
                std::thread::sleep(Duration::from_secs(2));
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            })
            .await
            .expect("broker restarted");
        },
        nothing,
    )
    .await;
}

/// The local cluster's `pg_ctlcluster` arguments, when PostgreSQL runs on this host.
fn local_cluster() -> Option<String> {
    std::fs::read_dir("/etc/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_connections_killed_then_postgres_restarted() {
    let Some(version) = local_cluster() else {
        let message = "database_connections_killed_then_postgres_restarted needs the PostgreSQL under test on this \
                       host (pg_ctlcluster) to restart it";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{message}");
        eprintln!("NOT RUN: {message}");
        return;
    };
    scenario(
        "database-faults",
        &[],
        async |shop: &mut Shop| {
            let admin = sqlx::PgPool::connect(&database_url().await).await.expect("PostgreSQL reachable");
            let killed: Vec<(bool,)> = sqlx::query_as(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 OR datname = $2",
            )
            .bind(&shop.catalog.database.0)
            .bind(&shop.ordering.database.0)
            .fetch_all(&admin)
            .await
            .expect("terminate backends");
            assert!(!killed.is_empty(), "the services had connections to kill");
            admin.close().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let status = tokio::process::Command::new("pg_ctlcluster")
                .args(["--skip-systemctl-redirect", &version, "main", "restart", "-m", "immediate"])
                .status()
                .await
                .expect("pg_ctlcluster runs");
            assert!(status.success(), "PostgreSQL restarted");
        },
        nothing,
    )
    .await;
}

/// Redeliveries of real events (same message ids) and poison messages injected straight into the ordering
/// service's queue: the duplicates are skipped, each poison message is dead-lettered with its reason, the good
/// events flow on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_and_poison_messages_injected() {
    const DUPLICATES: usize = 40;
    let injected = Arc::new(AtomicUsize::new(0));
    let expected = injected.clone();
    scenario(
        "duplicates-and-poison",
        &[],
        async move |shop: &mut Shop| {
            // Duplicates: the catalog's own published events, exactly as they were, through the framework's bus.
            let catalog = Outbox::new(shop.catalog.pool.clone(), OutboxConfig::new(shop.catalog.name.as_str()))
                .expect("catalog outbox");
            let published = catalog.published_events(0, i64::MAX, None, DUPLICATES as i64).await.expect("published");
            assert!(published.len() >= 6, "the seeded products' events at least: {}", published.len());
            injected.store(published.len(), Ordering::SeqCst);
            let exchange = shop.exchange.clone();
            let bus = rabbit_bus(|c| c.exchange = exchange).await;
            for (_, envelope) in published {
                bus.publish_confirmed(envelope).await.expect("duplicate published");
            }
            bus.shutdown().await;

            // Poison, straight into the queue (default exchange).
            let channel = plain_amqp().await;
            let queue = shop.ordering.name.clone();
            let properties = |id: Option<&str>, kind: &str| {
                let mut p =
                    BasicProperties::default().with_type(kind.into()).with_content_type("application/json".into());
                if let Some(id) = id {
                    p = p.with_message_id(id.into());
                }
                let mut headers = FieldTable::default();
                headers.insert("x-event-version".into(), AMQPValue::LongInt(1));
                p.with_headers(headers)
            };
            let id = || Uuid::now_v7().to_string();
            let oversized = vec![b' '; 300 * 1024];
            let poison: Vec<(BasicProperties, &[u8])> = vec![
                (properties(Some(&id()), "OrderStockConfirmed"), b"{not json"),
                (properties(Some(&id()), "NoSuchEvent"), b"{}"),
                (properties(None, "OrderStockConfirmed"), br#"{"order_id":"0193a8e0-0000-7000-8000-000000000000"}"#),
                (properties(Some(&id()), "OrderStockConfirmed"), &oversized),
            ];
            for (properties, body) in poison {
                channel
                    .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), body, properties)
                    .await
                    .expect("publish poison")
                    .await
                    .expect("poison confirmed");
            }
        },
        async move |shop: &Shop, ledger: &mut Ledger| {
            ledger.expected_dead_letters = 4;
            let injected = expected.load(Ordering::SeqCst);
            ledger.extra.push(format!("duplicates_injected={injected}"));
            let client = shop.client();
            let skipped = client.metric(&client.ordering, "bus_duplicates_total").await.unwrap().unwrap_or(0.0);
            assert!(skipped >= injected as f64, "ordering's inbox skipped the {injected} duplicates: {skipped}");
            let start = Instant::now();
            while shop.dead_letters().await < 4 && start.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ledger.dead_lettered = shop.dead_letters().await;
        },
    )
    .await;
}

/// The catalog is frozen (SIGSTOP) for 5 s while orders keep coming: messages wait in its queue, the ordering
/// process's memory stays flat, and once resumed the catalog drains the backlog with bounded memory (prefetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_while_the_producer_bursts() {
    let rss: Arc<std::sync::Mutex<HashMap<&'static str, u64>>> = Arc::default();
    let (during, after) = (rss.clone(), rss.clone());
    scenario(
        "slow-consumer",
        &[],
        async move |shop: &mut Shop| {
            let catalog = shop.catalog.process.as_ref().expect("catalog running");
            let ordering = shop.ordering.process.as_ref().expect("ordering running");
            let before = ordering.rss_kib().unwrap_or(0);
            catalog.signal("STOP");
            let mut peak = before;
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                peak = peak.max(ordering.rss_kib().unwrap_or(0));
            }
            catalog.signal("CONT");
            let mut rss = during.lock().unwrap();
            rss.insert("ordering_rss_kib_before", before);
            rss.insert("ordering_rss_kib_peak_while_stalled", peak);
        },
        async move |shop: &Shop, ledger: &mut Ledger| {
            let catalog = shop.catalog.process.as_ref().expect("catalog running").rss_kib().unwrap_or(0);
            let rss = after.lock().unwrap();
            for (key, value) in rss.iter() {
                ledger.extra.push(format!("{key}={value}"));
            }
            ledger.extra.push(format!("catalog_rss_kib_after_drain={catalog}"));
            let growth = rss["ordering_rss_kib_peak_while_stalled"].saturating_sub(rss["ordering_rss_kib_before"]);
            assert!(growth < 64 * 1024, "the producer's memory stays bounded while its consumer stalls: +{growth} KiB");
        },
    )
    .await;
}

/// A transaction holds back PostgreSQL's xmin (a snapshot kept open on the ordering database) for the whole
/// burst: dead outbox rows cannot be vacuumed; the relay must keep going. Throughput is in `events_per_s`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_transaction_holds_back_xmin() {
    let holder: Arc<Mutex<Option<sqlx::Transaction<'static, sqlx::Postgres>>>> = Arc::default();
    let (open, close) = (holder.clone(), holder.clone());
    scenario(
        "long-transaction",
        &[],
        async move |shop: &mut Shop| {
            let mut tx = shop.ordering.pool.begin().await.expect("begin");
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await.expect("isolation");
            let _: i64 = sqlx::query_scalar("SELECT count(*) FROM bus_outbox").fetch_one(&mut *tx).await.expect("snapshot");
            *open.lock().await = Some(tx);
        },
        async move |_: &Shop, ledger: &mut Ledger| {
            let tx = close.lock().await.take().expect("the long transaction was open throughout");
            let age: f64 = {
                let mut tx = tx;
                let age = sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8 FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap_or(0.0);
                tx.commit().await.expect("commit");
                age
            };
            ledger.extra.push(format!("xmin_held_s={age:.1}"));
        },
    )
    .await;
}

/// The relays' retry schedule in the outage and blocked-key scenarios: 3 attempts, 50 ms then 100 ms apart, so
/// that the whole schedule is over long before the fault is (the default schedule, 10 attempts over 8.5
/// minutes, behaves the same, only slower to show).
const SHORT_RETRY: [(&str, &str); 2] = [("RELAY_MAX_ATTEMPTS", "3"), ("RELAY_RETRY_DELAY_MS", "50")];

async fn outbox_status(service: &integration_tests::shop::ShopService) -> outbox::OutboxStatus {
    let outbox = Outbox::new(service.pool.clone(), OutboxConfig::new(service.name.as_str())).expect("outbox");
    outbox.status().await.expect("outbox status")
}

/// RabbitMQ stopped for 8 s, far longer than the relays' whole retry schedule, while orders keep coming: no
/// event becomes `failed`, none is lost, and everything settles within seconds of the broker's return, with no
/// operator action.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_outage_longer_than_the_retry_schedule() {
    let env: Vec<(Service, &str, &str)> = [Service::Catalog, Service::Ordering]
        .into_iter()
        .flat_map(|service| SHORT_RETRY.iter().map(move |(k, v)| (service, *k, *v)))
        .collect();
    let failed_during = Arc::new(AtomicUsize::new(0));
    let failed = failed_during.clone();
    scenario(
        "broker-outage",
        &env,
        async move |shop: &mut Shop| {
            tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"])).await.expect("broker stopped");
            let down = Instant::now();
            while down.elapsed() < Duration::from_secs(8) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let (c, o) = (outbox_status(&shop.catalog).await, outbox_status(&shop.ordering).await);
                failed.fetch_max((c.failed + o.failed) as usize, Ordering::SeqCst);
            }
            tokio::task::spawn_blocking(|| {
                rabbitmqctl(&["start_app"]);
                rabbitmqctl(&["await_startup"]);
            })
            .await
            .expect("broker started");
        },
        async move |shop: &Shop, ledger: &mut Ledger| {
            let (c, o) = (outbox_status(&shop.catalog).await, outbox_status(&shop.ordering).await);
            let during = failed_during.load(Ordering::SeqCst);
            ledger.extra.push(format!("outage_s=8 failed_rows_during_outage={during}"));
            assert_eq!(during, 0, "an outage turns no event into failed");
            assert_eq!((c.failed, o.failed), (0, 0), "no failed row after the outage: {c:?} {o:?}");
        },
    )
    .await;
}

/// One order's events are refused by the ordering service's broker (a failpoint nacks its key) until its head
/// event is `failed` and the key parked; the other orders flow meanwhile. Then the cause is fixed and the row
/// retried (the operator's `busctl outbox retry`): the key's events follow in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocked_key_parks_its_events_while_the_others_flow() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let refuse = dir.path().join("refused-keys");
    let refuse_path = refuse.to_string_lossy().into_owned();
    let mut env: Vec<(Service, &str, &str)> = SHORT_RETRY.iter().map(|(k, v)| (Service::Ordering, *k, *v)).collect();
    env.push((Service::Ordering, "BUS_FAILPOINT_REFUSE_KEYS", refuse_path.as_str()));
    let figures: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let noted = figures.clone();
    scenario(
        "blocked-key",
        &env,
        async move |shop: &mut Shop| {
            std::fs::write(&refuse, "next\n").expect("arm the failpoint");
            let client = shop.client();
            let parked_at = Instant::now();
            let parked = async || client.metric(&client.ordering, "bus_outbox_parked_keys").await.ok().flatten();
            while parked().await != Some(1.0) {
                assert!(parked_at.elapsed() < Duration::from_secs(30), "the refused key was never parked");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let key = std::fs::read_to_string(&refuse).expect("the failpoint wrote the key").trim().to_owned();
            // While the key is parked, the other orders go on.
            let published = async || client.metric(&client.ordering, "bus_published_total").await.ok().flatten();
            let before = published().await.unwrap_or(0.0);
            let window = Instant::now();
            // Up to 2 s, but no longer than it takes to see other events go out: the burst may be near its end.
            let mut during = 0.0;
            while window.elapsed() < Duration::from_secs(2) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                during = published().await.unwrap_or(0.0) - before;
                if during >= 10.0 {
                    break;
                }
            }
            let per_s = during / window.elapsed().as_secs_f64();
            if during == 0.0 {
                // Nothing went out in the window: fine only if the burst was over, i.e. nothing but the parked
                // key's events is waiting (otherwise the parked key stalls the others).
                let waiting_elsewhere: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM bus_outbox WHERE status = 0 AND partition_key IS DISTINCT FROM $1",
                )
                .bind(&key)
                .fetch_one(&shop.ordering.pool)
                .await
                .expect("count the other keys' pending events");
                assert_eq!(waiting_elsewhere, 0, "other keys kept flowing while one key was parked");
            }
            let status = outbox_status(&shop.ordering).await;
            assert_eq!((status.failed, status.parked_keys), (1, 1), "{status:?}");
            // The cause is fixed, then the operator re-queues the failed event.
            std::fs::remove_file(&refuse).expect("disarm the failpoint");
            let ordering = Outbox::new(shop.ordering.pool.clone(), OutboxConfig::new(shop.ordering.name.as_str()))
                .expect("outbox");
            assert_eq!(ordering.retry_failed(None).await.expect("retry"), 1);
            noted.lock().unwrap().push(format!(
                "parked_key={key} parked_after_ms={} others_published_per_s_while_parked={per_s:.0}",
                parked_at.elapsed().as_millis().saturating_sub(window.elapsed().as_millis())
            ));
        },
        async move |shop: &Shop, ledger: &mut Ledger| {
            ledger.extra.extend(figures.lock().unwrap().drain(..));
            let status = outbox_status(&shop.ordering).await;
            assert_eq!((status.failed, status.parked_keys), (0, 0), "{status:?}");
        },
    )
    .await;
}

/// Handlers fail transiently 1 to 3 times for a seeded 10 % of the events, in the middle of keyed streams (half of
/// the failures before the handler's effect, half after its transaction committed), on both buses, partitioned
/// and not: nothing lost, no duplicate effect, nothing reordered, no dead letter; the retried events' keys wait
/// while the other keys go on (`others_per_s_while_a_key_retries`, next to the run's `events_per_s`).
async fn transient_failures(name: &str, bus: TransientBus) {
    let faults = TransientFaults::new(10, fault_seed());
    let setting = format!("{}:{}", faults.percent, faults.seed);
    let mut env: Vec<(Service, &str, &str)> = Vec::new();
    let launch = match bus {
        // Confirmed once queued, so that several events of a key are in the bus at once, as on RabbitMQ (confirmed
        // once handled, the relay would send a key's next event only after the previous one was handled, and no
        // overtaking could ever show).
        TransientBus::InProc => Launch::Embedded(Box::new((
            samples::host::ServiceOptions { transient_faults: Some(faults.clone()), ..Default::default() },
            bus_inproc::InProcConfig { confirm_on: bus_inproc::ConfirmOn::Enqueued, ..Default::default() },
        ))),
        TransientBus::RabbitMq { partitions } => {
            for service in [Service::Catalog, Service::Ordering] {
                env.push((service, "FAULT_TRANSIENT_FAILURES", setting.as_str()));
                if let Some(partitions) = partitions {
                    env.push((service, "BUS_PARTITIONS", partitions));
                }
            }
            Launch::Processes(&env)
        }
    };
    scenario_on(
        name,
        launch,
        // Keyed streams: every product's price changes 20 times in a row (each change applies only on top of the
        // one before), so a retried change that was overtaken shows up as reordered (or refused).
        async |shop: &mut Shop| {
            let client = shop.client();
            let items = client.items().await.expect("items readable");
            let streams = items.into_iter().map(|item| {
                let client = client.clone();
                async move {
                    for step in 1..=PRICE_CHANGES {
                        client.set_price(item.id, item.price_cents + step).await.expect("price changed");
                    }
                }
            });
            futures::future::join_all(streams).await;
        },
        async move |shop: &Shop, ledger: &mut Ledger| {
            let figures = retry_figures(shop, &faults).await;
            let client = shop.client();
            let (mut retried, mut counts) = (0.0, samples::faults::FaultCounts::default());
            for base in [&client.catalog, &client.ordering] {
                retried += client.metric(base, "bus_retries_total").await.ok().flatten().unwrap_or(0.0);
                let counted = client.fault_counts(base).await.expect("the services count their faults");
                counts.injected += counted.injected;
                counts.natural += counted.natural;
                counts.overtaken += counted.overtaken;
            }
            ledger.extra.push(format!(
                "faults={}:{} {counts} faulty_events={} seeded_failures={} retried={retried} \
                 others_per_s_while_a_key_retries={:.0} retry_window_ms_p50={}",
                faults.percent,
                faults.seed,
                figures.faulty_events,
                figures.injected_failures,
                figures.others_per_s,
                figures.window_ms_p50
            ));
            assert!(figures.faulty_events > 0, "the seed made some events fail: {figures:?}");
            // A handling fails only when a failure is injected, or when a price change arrives before the one it
            // applies on (it fails transiently and waits for it): any retry beyond the injected failures means
            // that an event of a key overtook an earlier one of its key.
            // An event that overtook an earlier one of its key fails ("has not arrived yet") and retries.
            assert_eq!(counts.overtaken, 0, "no event overtook an earlier one of its key: {counts}");
            assert!(counts.injected > 0, "failures were injected: {counts}");
            assert_eq!(
                retried,
                (counts.injected + counts.natural) as f64,
                "every failure, injected or the handler's own, was retried: {counts}"
            );
            assert!(figures.others_per_s > 0.0, "other keys went on while a key retried: {figures:?}");
        },
    )
    .await;
}

/// Price changes per product in [`transient_failures`].
const PRICE_CHANGES: i64 = 20;

/// Where [`transient_failures`] runs.
enum TransientBus {
    InProc,
    RabbitMq { partitions: Option<&'static str> },
}

#[derive(Debug)]
struct RetryFigures {
    faulty_events: usize,
    injected_failures: u32,
    /// Events of other keys handled while a faulty event waited (from its enqueue to its handling), per second of
    /// such waiting.
    others_per_s: f64,
    window_ms_p50: i64,
}

/// From both services' outboxes (when each event was enqueued) and inboxes (when it was handled): how the
/// retried events' waits went.
async fn retry_figures(shop: &Shop, faults: &TransientFaults) -> RetryFigures {
    type Row = (Uuid, Option<String>, chrono::DateTime<chrono::Utc>);
    let mut figures = RetryFigures { faulty_events: 0, injected_failures: 0, others_per_s: 0.0, window_ms_p50: 0 };
    let (mut others, mut waited_ms, mut windows) = (0usize, 0i64, Vec::new());
    for (publisher, subscriber) in [(&shop.catalog, &shop.ordering), (&shop.ordering, &shop.catalog)] {
        let enqueued: Vec<Row> = sqlx::query_as("SELECT event_id, partition_key, occurred_at FROM bus_outbox")
            .fetch_all(&publisher.pool)
            .await
            .expect("outbox readable");
        let handled: HashMap<Uuid, chrono::DateTime<chrono::Utc>> =
            sqlx::query_as::<_, (Uuid, chrono::DateTime<chrono::Utc>)>("SELECT event_id, handled_at FROM bus_inbox")
                .fetch_all(&subscriber.pool)
                .await
                .expect("inbox readable")
                .into_iter()
                .collect();
        for (id, key, at) in &enqueued {
            let Some(fault) = faults.fault(*id) else { continue };
            let Some(done) = handled.get(id) else { continue };
            figures.faulty_events += 1;
            figures.injected_failures += fault.failures;
            let window = (*done - *at).num_milliseconds().max(1);
            windows.push(window);
            waited_ms += window;
            others += enqueued
                .iter()
                .filter(|(other, other_key, _)| other != id && other_key != key)
                .filter_map(|(other, _, _)| handled.get(other))
                .filter(|t| *t > at && *t < done)
                .count();
        }
    }
    windows.sort_unstable();
    figures.window_ms_p50 = windows.get(windows.len() / 2).copied().unwrap_or(0);
    figures.others_per_s = others as f64 * 1000.0 / waited_ms.max(1) as f64;
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_on_rabbitmq() {
    transient_failures("transient-failures-rabbitmq", TransientBus::RabbitMq { partitions: None }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_on_rabbitmq_partitioned() {
    transient_failures("transient-failures-rabbitmq-partitioned", TransientBus::RabbitMq { partitions: Some("3") })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_on_the_in_process_bus() {
    transient_failures("transient-failures-inproc", TransientBus::InProc).await;
}

/// A real 3-node RabbitMQ cluster on loopback (`tests/cluster/rabbitmq-cluster.sh`), stopped (by the pids the
/// script recorded) when dropped.
struct Cluster {
    dir: std::path::PathBuf,
}

impl Cluster {
    const SCRIPT: &'static str = concat!(env!("CARGO_MANIFEST_DIR"), "/cluster/rabbitmq-cluster.sh");

    async fn start() -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("rabbitmq-cluster-{}", std::process::id()));
        let cluster = Self { dir };
        cluster.run(&["start"]).await;
        cluster
    }

    async fn run(&self, args: &[&str]) -> String {
        let output = tokio::process::Command::new("bash")
            .arg(Self::SCRIPT)
            .args(args)
            .env("RABBITMQ_CLUSTER_DIR", &self.dir)
            .output()
            .await
            .expect("bash runs the cluster script");
        assert!(
            output.status.success(),
            "rabbitmq-cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Self::SCRIPT)
            .arg("stop")
            .env("RABBITMQ_CLUSTER_DIR", &self.dir)
            .status();
    }
}

/// What happens to the node that leads the catalog's queue in the middle of the burst.
#[derive(Clone, Copy, Debug)]
enum NodeFault {
    /// SIGKILL, restarted 3 s later.
    Killed,
    /// Stopped gracefully, started again 3 s later.
    Stopped,
}

/// The sample services on PostgreSQL and the 3-node cluster with quorum queues (`BUS_QUEUE_TYPE=quorum`,
/// `AMQP_URL` listing every node): a burst of orders, and in the middle the node that leads the catalog's queue
/// (partition 0 of it, if partitioned) fails as `fault` says and comes back. The ledger as in every scenario.
async fn on_the_cluster(name: &str, cluster: &Cluster, urls: &str, partitions: Option<&str>, fault: NodeFault) {
    let mut env: Vec<(Service, &str, &str)> = Vec::new();
    for service in [Service::Catalog, Service::Ordering] {
        env.push((service, "AMQP_URL", urls));
        env.push((service, "BUS_QUEUE_TYPE", "quorum"));
        if let Some(partitions) = partitions {
            env.push((service, "BUS_PARTITIONS", partitions));
        }
    }
    let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let noted = failed.clone();
    scenario_on(
        name,
        Launch::Processes(&env),
        async move |shop: &mut Shop| {
            let queue = match partitions {
                Some(_) => format!("{}.p000", shop.catalog.name),
                None => shop.catalog.name.clone(),
            };
            let leader = cluster.run(&["leader", &queue]).await;
            let started = Instant::now();
            match fault {
                NodeFault::Killed => cluster.run(&["kill", &leader]).await,
                NodeFault::Stopped => cluster.run(&["stop-node", &leader]).await,
            };
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.run(&["restart", &leader]).await;
            noted.lock().unwrap().push(format!(
                "queue_type=quorum nodes=3 {fault:?}_leader_of={queue} node={leader} node_back_after_ms={}",
                started.elapsed().as_millis()
            ));
        },
        async move |_: &Shop, ledger: &mut Ledger| ledger.extra.extend(failed.lock().unwrap().drain(..)),
    )
    .await;
}

/// Issue 17: the framework on a RabbitMQ cluster with quorum queues survives the loss of a node: the leader of
/// the service queue SIGKILLed, then stopped gracefully, and the partitioned flow with its leader killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_cluster_survives_the_loss_of_the_leading_node() {
    let cluster = Cluster::start().await;
    let urls = cluster.run(&["urls"]).await;
    on_the_cluster("cluster-leader-killed", &cluster, &urls, None, NodeFault::Killed).await;
    on_the_cluster("cluster-leader-stopped", &cluster, &urls, None, NodeFault::Stopped).await;
    on_the_cluster("cluster-partitioned-leader-killed", &cluster, &urls, Some("3"), NodeFault::Killed).await;
}

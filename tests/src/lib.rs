//! The test harness: real services, isolated per test, and helpers that wait for conditions instead of sleeping.
//!
//! Each service is found in this order: the env var (`TEST_DATABASE_URL`, `TEST_AMQP_URL`); else the local default
//! (`postgres://postgres@127.0.0.1:5432/postgres`, `amqp://guest:guest@127.0.0.1:5672/%2f`) if it answers; else a
//! container started with testcontainers when a Docker engine answers (pinned images `postgres:15-alpine`,
//! `rabbitmq:3.10-management`; one per test binary, kept for its lifetime); else the test fails with a message
//! saying how to provide the service. It never skips, under `CI=true` or not. (The broker fault tests also need
//! `rabbitmqctl` on the host.) Each PostgreSQL test gets its own schema (our tables and its business tables live there), dropped at
//! the end; each SQLite test its own database file in a temporary directory.

use std::future::Future;
use std::time::{Duration, Instant};

pub mod partitioned;
pub mod shop;

use async_trait::async_trait;
use bus_core::IntegrationEvent;
use outbox::{Backend, OutboxConfig};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Postgres, Sqlite};

/// The local default used when `TEST_DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Sends the framework's logs to the test output, filtered by `RUST_LOG` (default: warnings). Idempotent.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

static DATABASE_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
static AMQP_URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
/// Containers started for this test binary, kept alive until it exits.
static CONTAINERS: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> = std::sync::Mutex::new(Vec::new());

fn answers(address: &str) -> bool {
    address
        .parse()
        .ok()
        .is_some_and(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())
}

fn keep<T: Send + 'static>(container: T) {
    CONTAINERS.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(container));
}

/// Starts `request` and returns the host and the host port mapped to `port`; the container lives as long as the
/// test binary.
async fn start_container<I>(
    request: testcontainers_modules::testcontainers::ContainerRequest<I>,
    port: u16,
) -> Result<(String, u16), String>
where
    I: testcontainers_modules::testcontainers::Image + Send + Sync + 'static,
{
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    let container = request.start().await.map_err(|e| e.to_string())?;
    let host = container.get_host().await.map_err(|e| e.to_string())?;
    let host_port = container.get_host_port_ipv4(port).await.map_err(|e| e.to_string())?;
    keep(container);
    Ok((host.to_string(), host_port))
}

async fn postgres_container() -> Result<String, String> {
    use testcontainers_modules::testcontainers::ImageExt;
    let request = testcontainers_modules::postgres::Postgres::default().with_tag("15-alpine");
    let (host, port) = start_container(request, 5432).await?;
    Ok(format!("postgres://postgres:postgres@{host}:{port}/postgres"))
}

async fn rabbitmq_container() -> Result<String, String> {
    use testcontainers_modules::testcontainers::ImageExt;
    let request = testcontainers_modules::rabbitmq::RabbitMq::default().with_tag("3.10-management");
    let (host, port) = start_container(request, 5672).await?;
    Ok(format!("amqp://guest:guest@{host}:{port}/%2f"))
}

/// The PostgreSQL URL the tests use (env var, local default, or a container; see the module docs).
pub async fn database_url() -> String {
    DATABASE_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                return url;
            }
            if answers("127.0.0.1:5432") {
                return DEFAULT_DATABASE_URL.to_owned();
            }
            postgres_container().await.unwrap_or_else(|error| {
                panic!(
                    "no PostgreSQL for the tests: TEST_DATABASE_URL is not set, nothing answers on 127.0.0.1:5432, \
                     and no container could be started ({error}). Set TEST_DATABASE_URL=postgres://user@host:port/db, \
                     start the local server (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start), \
                     or run a Docker engine."
                )
            })
        })
        .await
        .clone()
}

/// The local default used when `TEST_AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The RabbitMQ URL the tests use (env var, local default, or a container; see the module docs).
pub async fn amqp_url() -> String {
    AMQP_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_AMQP_URL") {
                return url;
            }
            if answers("127.0.0.1:5672") {
                return DEFAULT_AMQP_URL.to_owned();
            }
            rabbitmq_container().await.unwrap_or_else(|error| {
                panic!(
                    "no RabbitMQ for the tests: TEST_AMQP_URL is not set, nothing answers on 127.0.0.1:5672, and no \
                     container could be started ({error}). Set TEST_AMQP_URL=amqp://user:pass@host:5672/%2f, start the \
                     local broker (rabbitmq-server -detached), or run a Docker engine."
                )
            })
        })
        .await
        .clone()
}

/// A unique name for this test's exchange or queue.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A RabbitMQ bus on a fresh exchange; fails with instructions when the broker cannot be reached.
pub async fn rabbit_bus(configure: impl FnOnce(&mut bus_rabbitmq::RabbitConfig)) -> bus_rabbitmq::RabbitBus {
    init_tracing();
    let mut config = bus_rabbitmq::RabbitConfig::new(&amqp_url().await).expect("TEST_AMQP_URL is a valid AMQP URL");
    config.exchange = unique("test.events");
    configure(&mut config);
    bus_rabbitmq::RabbitBus::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach RabbitMQ ({e}). Set TEST_AMQP_URL=amqp://user:pass@host:5672/%2f, or start the local \
             broker: rabbitmq-server -detached"
        )
    })
}

/// A plain lapin connection, as a service in another language would have.
pub async fn plain_amqp() -> lapin::Channel {
    let connection = lapin::Connection::connect(&amqp_url().await, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    connection.create_channel().await.expect("channel")
}

/// Deletes a group's queues and the exchange (best effort).
pub async fn delete_topology(exchange: &str, groups: &[&str]) {
    let channel = plain_amqp().await;
    for group in groups {
        for queue in [group.to_string(), format!("{group}.retry"), format!("{group}.dlq"), format!("{group}.bindings")]
        {
            let _ = channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
        }
    }
    let _ = channel.exchange_delete(exchange.into(), lapin::options::ExchangeDeleteOptions::default()).await;
}

/// Deletes a partitioned group's queues and exchanges, and the bus exchange (best effort).
pub async fn delete_partitioned_topology(exchange: &str, group: &str, partitions: u16) {
    let channel = plain_amqp().await;
    for index in 0..partitions {
        let queue = format!("{group}.p{index:03}");
        let _ = channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
    }
    for queue in [format!("{group}.dlq"), format!("{group}.partition-count"), format!("{group}.bindings")] {
        let _ = channel.queue_delete(queue.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
    }
    let exchanges = ["partitions", "partitions.unbucketed", "members"].map(|suffix| format!("{group}.{suffix}"));
    for name in exchanges.iter().map(String::as_str).chain([exchange]) {
        let _ = channel.exchange_delete(name.into(), lapin::options::ExchangeDeleteOptions::default()).await;
    }
}

/// A test event with a partition key and a sequence number within it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Numbered {
    /// The partition key.
    pub key: String,
    /// The position within the key.
    pub seq: u32,
}

impl IntegrationEvent for Numbered {
    const TYPE_NAME: &'static str = "Numbered";
    fn partition_key(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

/// A database for one test, with an `effects` table that handlers write to (one row per handled event).
pub struct Fixture<DB: Backend> {
    /// The pool.
    pub pool: Pool<DB>,
    /// The schema (PostgreSQL).
    pub schema: Option<String>,
    /// The quoted, qualified name of the effects table.
    pub effects: String,
    _dir: Option<tempfile::TempDir>,
}

impl<DB: Backend> Fixture<DB> {
    /// An outbox configuration for `service` in this fixture's schema.
    pub fn outbox_config(&self, service: &str) -> OutboxConfig {
        let config = OutboxConfig::new(service);
        match &self.schema {
            Some(schema) => config.schema(schema.clone()),
            None => config,
        }
    }

    /// The quoted, qualified name of `table` of the outbox built from [`outbox_config`](Self::outbox_config)
    /// (`"outbox"`, `"inbox"`, ...), for tests that look at or tamper with the rows themselves.
    pub fn table(&self, table: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"bus_{table}\""),
            None => format!("\"bus_{table}\""),
        }
    }
}

/// What the tests need of each database beyond the outbox itself.
#[async_trait]
pub trait TestDb: Backend + Sized {
    /// A fresh, isolated database.
    async fn fixture() -> Fixture<Self>;
    /// Records that `event_id` was handled (in the handler's transaction).
    async fn record_effect(conn: &mut Self::Connection, effects: &str, event_id: &str) -> Result<(), sqlx::Error>;
    /// Every recorded effect, one row per handling that committed.
    async fn effects(pool: &Pool<Self>, effects: &str) -> Vec<String>;
    /// A pool on the same database with its own connections (as another process would have).
    async fn second_pool(fixture: &Fixture<Self>) -> Pool<Self>;
    /// Runs a statement (test-written SQL, no parameters); returns the rows affected.
    async fn execute(pool: &Pool<Self>, sql: &str) -> u64;
    /// Runs test-written SQL (no parameters) on one connection.
    async fn execute_on(conn: &mut Self::Connection, sql: &str);
    /// The first column of every row of a query (test-written SQL), as integers.
    async fn integers(pool: &Pool<Self>, sql: &str) -> Vec<i64>;
}

#[async_trait]
impl TestDb for Postgres {
    async fn fixture() -> Fixture<Self> {
        init_tracing();
        let url = database_url().await;
        let pool = connect_pg(&url).await;
        let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
        let effects = format!("\"{schema}\".effects");
        sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(&pool).await.expect("create test schema");
        sqlx::query(&format!("CREATE TABLE {effects} (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)"))
            .execute(&pool)
            .await
            .expect("create effects table");
        Fixture { pool, schema: Some(schema), effects, _dir: None }
    }

    async fn record_effect(conn: &mut sqlx::PgConnection, effects: &str, event_id: &str) -> Result<(), sqlx::Error> {
        sqlx::query(&format!("INSERT INTO {effects} (event_id) VALUES ($1)")).bind(event_id).execute(conn).await?;
        Ok(())
    }

    async fn effects(pool: &Pool<Self>, effects: &str) -> Vec<String> {
        sqlx::query_scalar(&format!("SELECT event_id FROM {effects} ORDER BY seq"))
            .fetch_all(pool)
            .await
            .expect("read effects")
    }

    async fn second_pool(_fixture: &Fixture<Self>) -> Pool<Self> {
        connect_pg(&database_url().await).await
    }

    async fn execute_on(conn: &mut sqlx::PgConnection, sql: &str) {
        sqlx::query(sql).execute(&mut *conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn execute(pool: &Pool<Self>, sql: &str) -> u64 {
        sqlx::query(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}")).rows_affected()
    }

    async fn integers(pool: &Pool<Self>, sql: &str) -> Vec<i64> {
        sqlx::query_scalar(sql).fetch_all(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

async fn connect_pg(url: &str) -> Pool<Postgres> {
    let options: PgConnectOptions =
        url.parse().unwrap_or_else(|_| panic!("TEST_DATABASE_URL is not a valid postgres:// URL"));
    PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot reach PostgreSQL ({e}). Set TEST_DATABASE_URL=postgres://user@host:port/db, or start the \
                 local server: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
            )
        })
}

#[async_trait]
impl TestDb for Sqlite {
    async fn fixture() -> Fixture<Self> {
        init_tracing();
        let dir = tempfile::tempdir().expect("temporary directory");
        let pool = sqlite_pool(&dir.path().join("test.db")).await;
        sqlx::query("CREATE TABLE effects (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL)")
            .execute(&pool)
            .await
            .expect("create effects table");
        Fixture { pool, schema: None, effects: "effects".into(), _dir: Some(dir) }
    }

    async fn record_effect(
        conn: &mut sqlx::SqliteConnection,
        effects: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!("INSERT INTO {effects} (event_id) VALUES (?1)")).bind(event_id).execute(conn).await?;
        Ok(())
    }

    async fn effects(pool: &Pool<Self>, effects: &str) -> Vec<String> {
        sqlx::query_scalar(&format!("SELECT event_id FROM {effects} ORDER BY seq"))
            .fetch_all(pool)
            .await
            .expect("read effects")
    }

    async fn second_pool(fixture: &Fixture<Self>) -> Pool<Self> {
        let dir = fixture._dir.as_ref().expect("sqlite fixture has a directory");
        sqlite_pool(&dir.path().join("test.db")).await
    }

    async fn execute_on(conn: &mut sqlx::SqliteConnection, sql: &str) {
        sqlx::query(sql).execute(&mut *conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    async fn execute(pool: &Pool<Self>, sql: &str) -> u64 {
        sqlx::query(sql).execute(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}")).rows_affected()
    }

    async fn integers(pool: &Pool<Self>, sql: &str) -> Vec<i64> {
        sqlx::query_scalar(sql).fetch_all(pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// A SQLite pool as we recommend it: WAL, `synchronous = NORMAL`, a busy timeout for concurrent writers.
pub async fn sqlite_pool(path: &std::path::Path) -> Pool<Sqlite> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new().max_connections(8).connect_with(options).await.expect("open SQLite database")
}

impl<DB: Backend> Drop for Fixture<DB> {
    fn drop(&mut self) {
        // Best effort: drop the test schema on a fresh connection (the test's runtime may be gone).
        if let Some(schema) = self.schema.take() {
            let url = DATABASE_URL.get().cloned().unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                runtime.block_on(async move {
                    let pool = PgPoolOptions::new().max_connections(1).connect(&url).await.ok()?;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).execute(&pool).await.ok()
                })
            })
            .join();
        }
    }
}

/// Polls `condition` until it holds, failing the test with `what` after `timeout`. For conditions that have no
/// notification (rows in a database); polling a fact is not sleeping on a guess.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// Runs each named `async fn name<DB: TestDb>()` of the calling test file on both databases, as
/// `name::postgres` and `name::sqlite`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name::<sqlx::Postgres>().await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name::<sqlx::Sqlite>().await
            }
        }
    )*};
}

/// A relay configuration for tests: small batches, a 500 ms lease, a 50 ms poll, 3 attempts 20 ms apart.
pub fn fast_relay() -> outbox::RelayConfig {
    outbox::RelayConfig {
        batch_size: 100,
        lease: Duration::from_millis(500),
        poll_interval: Duration::from_millis(50),
        retry: bus_core::RetryPolicy::exponential(3, Duration::from_millis(20)).with_jitter(0.0),
        ..outbox::RelayConfig::default()
    }
}

/// The fixture's outbox for service `producer`, migrated.
pub async fn migrated_outbox<DB: TestDb>(fixture: &Fixture<DB>) -> outbox::Outbox<DB> {
    let outbox =
        outbox::Outbox::new(fixture.pool.clone(), fixture.outbox_config("producer")).expect("valid outbox config");
    outbox.migrate().await.expect("migrate");
    outbox
}

/// A bus whose publish never returns: a relay on it claims rows and hangs, as one that crashes or hangs on an
/// event would, before anything reaches a consumer.
pub struct HangingBus;

#[async_trait]
impl bus_core::EventBus for HangingBus {
    async fn publish(&self, _envelope: bus_core::Envelope) -> Result<bus_core::Confirmation, bus_core::BusError> {
        std::future::pending().await
    }

    async fn subscribe(
        &self,
        _subscription: bus_core::Subscription,
    ) -> Result<bus_core::SubscriptionHandle, bus_core::BusError> {
        Err(bus_core::BusError::Closed)
    }

    async fn health(&self) -> Result<(), bus_core::BusError> {
        Ok(())
    }
}

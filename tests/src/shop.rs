//! [`Shop`]: the two sample services as real processes, each with its own PostgreSQL database, on RabbitMQ (a
//! fresh exchange and queues per shop), and the [`Ledger`] that accounts for every event between them.
//!
//! The ledger reads what the framework keeps: each publisher's outbox (every event, its sequence number and
//! partition key; published rows are retained) and each subscriber's inbox (which events it handled, when). So:
//! - **lost** = events in a publisher's outbox that the subscribing service never handled, plus events still
//!   unpublished (pending or failed) at rest;
//! - **duplicate effects** = units counted twice or never: Σ over items of |units_sold − units of paid orders|
//!   and |initial stock − stock − units_sold| (the inbox's primary key makes a second inbox row impossible, so
//!   the effects are what is checked);
//! - **reordered** = per (publisher, subscriber, partition key), events handled in an order other than the
//!   publisher's outbox order;
//! - **dead-lettered** = messages in the services' `.dlq` queues.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use samples::Service;
use samples::client::ShopClient;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::{amqp_url, database_url, delete_topology};

/// A service running as its own process.
pub struct ServiceProcess {
    child: Child,
    /// Its base URL, e.g. `http://127.0.0.1:40123`.
    pub url: String,
}

impl ServiceProcess {
    /// Runs `program args…` with `env`, and waits (60 s at most) until it prints `… listening on <url>`.
    ///
    /// # Panics
    /// The process cannot be started or exits before it listens.
    pub async fn spawn(program: &Path, args: &[&str], env: &[(String, String)]) -> Self {
        Self::spawn_until(program, args, env, " listening on ").await
    }

    /// Runs `program args…` with `env`, and waits (60 s at most) until it prints a line with `marker`; `url` is
    /// what follows the marker on that line.
    ///
    /// # Panics
    /// The process cannot be started or exits before it prints the marker.
    pub async fn spawn_until(program: &Path, args: &[&str], env: &[(String, String)], marker: &str) -> Self {
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some((_, url)) = line.split_once(marker) {
                    return url.to_owned();
                }
            }
            panic!("{} {args:?} exited before listening", program.display())
        })
        .await
        .expect("service listening within 60 s");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, url }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// `kill -9`, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Waits until the process exits by itself (a failpoint), at most `timeout`; true if it did.
    pub async fn exited_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.child.wait()).await.is_ok()
    }

    /// Resident memory now, in KiB (Linux `/proc`), if readable.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the process to exit; true if it did.
    pub async fn terminate(&mut self, timeout: Duration) -> bool {
        self.signal("TERM");
        self.exited_within(timeout).await
    }

    /// Sends a signal by name (`STOP`, `CONT`) with `kill`.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.pid());
    }
}

/// Creates database `name` on the test PostgreSQL server; returns its URL.
pub async fn create_database(name: &str) -> String {
    let admin_url = database_url().await;
    let admin = PgPool::connect(&admin_url).await.expect("PostgreSQL reachable");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.expect("create database");
    admin.close().await;
    let base = admin_url.split('?').next().unwrap_or(&admin_url);
    let (server, _) = base.rsplit_once('/').expect("a database URL with a path");
    format!("{server}/{name}")
}

/// Drops database `name` (best effort, connections forced out).
pub async fn drop_database(name: &str) {
    if let Ok(admin) = PgPool::connect(&database_url().await).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
        admin.close().await;
    }
}

/// One of the shop's two services: its process, name, database and environment.
pub struct ShopService {
    /// Which service.
    pub service: Service,
    /// Its name (queue, event source): `<service>-<shop id>`.
    pub name: String,
    /// Its running process (`None` while killed).
    pub process: Option<ServiceProcess>,
    /// Its database's name and URL.
    pub database: (String, String),
    /// Its environment (the HTTP address is fixed after the first start, so restarts keep their URL).
    pub env: Vec<(String, String)>,
    /// A pool on its database, for the ledger.
    pub pool: PgPool,
}

/// The two sample services as processes, on their own databases and exchange.
pub struct Shop {
    /// Unique id of this shop (names of its databases, queues and exchange).
    pub id: String,
    /// Its exchange.
    pub exchange: String,
    /// The `shop-service` binary.
    pub binary: PathBuf,
    /// The catalog.
    pub catalog: ShopService,
    /// The ordering service.
    pub ordering: ShopService,
    /// Both services in this process on the in-process bus ([`Shop::embedded`]); `None`: each its own process
    /// on RabbitMQ.
    pub embedded: Option<samples::demo::Demo>,
    /// The broker node the test itself talks to (dead-letter counts, clean-up): the first node of the services'
    /// `AMQP_URL`.
    pub amqp: String,
}

impl Shop {
    /// Starts both services (`binary catalog|ordering`), each with a fresh database; `extra_env` applies to the
    /// first start of `service` only (e.g. a failpoint).
    pub async fn start(binary: &Path, extra_env: &[(Service, &str, &str)]) -> Self {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let exchange = format!("test.shop.{id}");
        let amqp = amqp_url().await;
        let mut services = Vec::new();
        for service in [Service::Catalog, Service::Ordering] {
            let name = format!("{}-{id}", service.default_name());
            let db_name = format!("{}_{id}", service.default_name());
            let db_url = create_database(&db_name).await;
            let env = vec![
                ("SERVICE_NAME".to_owned(), name.clone()),
                ("DATABASE_URL".to_owned(), db_url.clone()),
                ("AMQP_URL".to_owned(), amqp.clone()),
                ("BUS_EXCHANGE".to_owned(), exchange.clone()),
                ("HTTP_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
            ];
            let pool = PgPool::connect(&db_url).await.expect("service database reachable");
            services.push(ShopService { service, name, process: None, database: (db_name, db_url), env, pool });
        }
        let ordering = services.pop().expect("two");
        let catalog = services.pop().expect("two");
        // A cluster's URL (`AMQP_URL` in `extra_env`) lists its nodes: the test talks to the first.
        let amqp = extra_env
            .iter()
            .find(|(_, k, _)| *k == "AMQP_URL")
            .map(|(_, _, v)| v.split(',').next().unwrap_or(v).to_owned())
            .unwrap_or(amqp);
        let mut shop = Self { id, exchange, binary: binary.to_path_buf(), catalog, ordering, embedded: None, amqp };
        for service in [Service::Catalog, Service::Ordering] {
            let extra: Vec<(String, String)> = extra_env
                .iter()
                .filter(|(s, _, _)| *s == service)
                .map(|(_, k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            shop.launch(service, &extra).await;
        }
        shop
    }

    /// Both services in this process, on the in-process bus, each with a fresh PostgreSQL database, run with
    /// `options`: the embedded demo's wiring on the production database. Such a shop cannot kill or restart a
    /// service.
    pub async fn embedded(options: samples::host::ServiceOptions, bus: bus_inproc::InProcConfig) -> Self {
        let id = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let mut services = Vec::new();
        for service in [Service::Catalog, Service::Ordering] {
            let db_name = format!("{}_{id}", service.default_name());
            let db_url = create_database(&db_name).await;
            let pool = PgPool::connect(&db_url).await.expect("service database reachable");
            services.push(ShopService {
                service,
                name: service.default_name().to_owned(),
                process: None,
                database: (db_name, db_url),
                env: Vec::new(),
                pool,
            });
        }
        let ordering = services.pop().expect("two");
        let catalog = services.pop().expect("two");
        let url = |s: &ShopService| samples::config::DatabaseUrl::parse(&s.database.1).expect("a PostgreSQL URL");
        let local: std::net::SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let config = samples::demo::DemoConfig {
            catalog_addr: local,
            ordering_addr: local,
            databases: Some((url(&catalog), url(&ordering))),
            options,
            bus,
            ..samples::demo::DemoConfig::default()
        };
        let demo = samples::demo::Demo::start(config).await.expect("embedded shop started");
        Self {
            id,
            exchange: String::new(),
            binary: PathBuf::new(),
            catalog,
            ordering,
            embedded: Some(demo),
            amqp: String::new(),
        }
    }

    /// The service `service`.
    pub fn service(&mut self, service: Service) -> &mut ShopService {
        match service {
            Service::Catalog => &mut self.catalog,
            Service::Ordering => &mut self.ordering,
        }
    }

    async fn launch(&mut self, service: Service, extra_env: &[(String, String)]) {
        assert!(self.embedded.is_none(), "an embedded shop runs both services in this process: no restart");
        let binary = self.binary.clone();
        let target = self.service(service);
        let mut env = target.env.clone();
        env.extend_from_slice(extra_env);
        let process = ServiceProcess::spawn(&binary, &[service.default_name()], &env).await;
        // Restarts listen where the first start did, so clients keep their URLs.
        let addr = process.url.trim_start_matches("http://").to_owned();
        if let Some(slot) = target.env.iter_mut().find(|(k, _)| k == "HTTP_ADDR") {
            slot.1 = addr;
        }
        target.process = Some(process);
    }

    /// True if a service process has exited by itself (a failpoint, a crash).
    pub fn any_exited(&mut self) -> bool {
        [&mut self.catalog, &mut self.ordering]
            .into_iter()
            .filter_map(|s| s.process.as_mut())
            .any(|p| matches!(p.child.try_wait(), Ok(Some(_))))
    }

    /// A client of both services.
    pub fn client(&self) -> ShopClient {
        if let Some(demo) = &self.embedded {
            return demo.client.clone();
        }
        let url = |s: &ShopService| s.process.as_ref().map(|p| p.url.clone()).expect("service running");
        ShopClient::new(url(&self.catalog), url(&self.ordering))
    }

    /// `kill -9` of `service`.
    pub async fn kill(&mut self, service: Service) {
        assert!(self.embedded.is_none(), "an embedded shop runs both services in this process: no kill");
        if let Some(mut process) = self.service(service).process.take() {
            process.kill().await;
        }
    }

    /// Starts `service` again (same database, queue and address).
    pub async fn restart(&mut self, service: Service) {
        self.kill(service).await;
        self.launch(service, &[]).await;
    }

    /// Deletes the queues, the exchange and both databases.
    pub async fn teardown(mut self) {
        if let Some(demo) = self.embedded.take() {
            demo.shutdown().await;
        } else {
            self.kill(Service::Catalog).await;
            self.kill(Service::Ordering).await;
            if self.amqp == crate::amqp_url().await {
                delete_topology(&self.exchange, &[&self.catalog.name, &self.ordering.name]).await;
            }
        }
        for service in [self.catalog, self.ordering] {
            service.pool.close().await;
            drop_database(&service.database.0).await;
        }
    }

    /// A channel on [`Shop::amqp`].
    async fn channel(&self) -> lapin::Channel {
        let connection = lapin::Connection::connect(&self.amqp, lapin::ConnectionProperties::default())
            .await
            .expect("the shop's broker answers");
        connection.create_channel().await.expect("a channel")
    }

    /// Messages now in each service's dead-letter queue.
    pub async fn dead_letters(&self) -> u64 {
        if let Some(demo) = &self.embedded {
            use bus_core::DeadLetterQueue;
            let mut total = 0;
            for name in [&self.catalog.name, &self.ordering.name] {
                let group = bus_core::GroupName::new(name).expect("a group name");
                total += demo.bus.dead_letters(&group).await.map_or(0, |letters| letters.len() as u64);
            }
            return total;
        }
        let channel = self.channel().await;
        let mut total = 0;
        for name in [&self.catalog.name, &self.ordering.name] {
            let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            let queue = format!("{name}.dlq");
            if let Ok(q) = channel.queue_declare(queue.as_str().into(), options, Default::default()).await {
                total += u64::from(q.message_count());
            }
        }
        total
    }

    /// Empties the dead-letter queues (after a scenario that expected dead letters counted them).
    pub async fn purge_dead_letters(&self) {
        let channel = self.channel().await;
        for name in [&self.catalog.name, &self.ordering.name] {
            let queue = format!("{name}.dlq");
            let _ = channel.queue_purge(queue.as_str().into(), Default::default()).await;
        }
    }

    /// Waits until the shop is at rest — every order settled, the outboxes empty, and every published event
    /// handled by its subscriber (a consumer may still be draining its queue after the outboxes are empty) — then
    /// returns the ledger, with the time that took. After [`SETTLE_TIMEOUT`] it returns the ledger as it stands:
    /// whatever is missing then is reported as lost.
    pub async fn settled_ledger(&self, scenario: &str, initial_stock: &HashMap<Uuid, i64>) -> Ledger {
        let start = Instant::now();
        let client = self.client();
        let _ = client.wait_settled(SETTLE_TIMEOUT, |_, _| {}).await;
        loop {
            let ledger = self.ledger(scenario, initial_stock, start.elapsed()).await;
            let at_rest = ledger.lost == 0 && ledger.unsettled == 0 && ledger.unpublished == 0;
            if at_rest && ledger.duplicate_effects == 0 || start.elapsed() > SETTLE_TIMEOUT {
                return ledger;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Accounts for every event and order (see the module docs) as they stand now.
    pub async fn ledger(&self, scenario: &str, initial_stock: &HashMap<Uuid, i64>, settle: Duration) -> Ledger {
        let client = self.client();
        let orders = client.orders().await.expect("orders readable");
        let items = client.items().await.expect("items readable");
        let mut ledger = Ledger {
            scenario: scenario.to_owned(),
            orders: orders.len(),
            paid: orders.iter().filter(|o| o.status == "paid").count(),
            cancelled: orders.iter().filter(|o| o.status == "cancelled").count(),
            settle_ms: settle.as_millis(),
            ..Ledger::default()
        };
        ledger.unsettled = orders.len() - ledger.paid - ledger.cancelled;

        let mut paid_units: HashMap<Uuid, i64> = HashMap::new();
        for order in orders.iter().filter(|o| o.status == "paid") {
            for line in &order.items {
                *paid_units.entry(line.product_id).or_default() += line.units;
            }
        }
        for item in &items {
            let sold = paid_units.get(&item.id).copied().unwrap_or(0);
            ledger.duplicate_effects += (item.units_sold - sold).unsigned_abs();
            if let Some(initial) = initial_stock.get(&item.id) {
                ledger.duplicate_effects += (initial - item.stock - item.units_sold).unsigned_abs();
            }
        }

        for (publisher, subscriber) in [(&self.catalog, &self.ordering), (&self.ordering, &self.catalog)] {
            let published = outbox_rows(&publisher.pool).await;
            let handled = inbox_rows(&subscriber.pool, &subscriber.name).await;
            ledger.events += published.len();
            ledger.unpublished += published.iter().filter(|e| e.status != PUBLISHED).count();
            let mut by_key: HashMap<&str, Vec<(i64, DateTime<Utc>)>> = HashMap::new();
            for event in &published {
                match handled.get(&(event.event_id, event.event_type.clone())) {
                    None => ledger.lost += 1,
                    Some(at) => {
                        if let Some(key) = &event.partition_key {
                            by_key.entry(key).or_default().push((event.seq, *at));
                        }
                    }
                }
            }
            for handlings in by_key.values_mut() {
                handlings.sort_by_key(|(seq, _)| *seq);
                ledger.reordered += handlings.windows(2).filter(|w| w[1].1 < w[0].1).count();
            }
        }
        ledger.dead_lettered = self.dead_letters().await;
        for base in [&client.catalog, &client.ordering] {
            ledger.duplicates_skipped +=
                client.metric(base, "bus_duplicates_total").await.ok().flatten().unwrap_or(0.0) as u64;
        }
        ledger
    }
}

const PUBLISHED: i16 = 1;

struct OutboxEvent {
    event_id: Uuid,
    event_type: String,
    partition_key: Option<String>,
    seq: i64,
    status: i16,
}

async fn outbox_rows(pool: &PgPool) -> Vec<OutboxEvent> {
    let rows: Vec<(Uuid, String, Option<String>, i64, i16)> =
        sqlx::query_as("SELECT event_id, event_type, partition_key, seq, status::int2 FROM bus_outbox ORDER BY seq")
            .fetch_all(pool)
            .await
            .expect("outbox readable");
    rows.into_iter()
        .map(|(event_id, event_type, partition_key, seq, status)| OutboxEvent {
            event_id,
            event_type,
            partition_key,
            seq,
            status,
        })
        .collect()
}

/// (event id, event type) → when `group` handled it.
async fn inbox_rows(pool: &PgPool, group: &str) -> HashMap<(Uuid, String), DateTime<Utc>> {
    let rows: Vec<(Uuid, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT event_id, handler, handled_at FROM bus_inbox")
            .fetch_all(pool)
            .await
            .expect("inbox readable");
    let prefix = format!("{group}/");
    rows.into_iter()
        .filter_map(|(id, handler, at)| handler.strip_prefix(&prefix).map(|t| ((id, t.to_owned()), at)))
        .collect()
}

/// What happened to every order and event of one scenario.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// The scenario's name.
    pub scenario: String,
    /// Orders stored.
    pub orders: usize,
    /// Paid ones.
    pub paid: usize,
    /// Cancelled ones.
    pub cancelled: usize,
    /// Orders neither paid nor cancelled.
    pub unsettled: usize,
    /// Events the two services published to each other.
    pub events: usize,
    /// Events never handled by their subscriber.
    pub lost: usize,
    /// Events still pending or failed in an outbox.
    pub unpublished: usize,
    /// Units counted twice (or never): see the module docs.
    pub duplicate_effects: u64,
    /// Redeliveries the inboxes skipped (since each process's last start).
    pub duplicates_skipped: u64,
    /// Handled out of outbox order, per key.
    pub reordered: usize,
    /// Messages in the dead-letter queues.
    pub dead_lettered: u64,
    /// Dead letters the scenario injected on purpose.
    pub expected_dead_letters: u64,
    /// From the end of the burst (and fault) until settled.
    pub settle_ms: u128,
    /// Anything else the scenario measured, `key=value`.
    pub extra: Vec<String>,
}

impl Ledger {
    /// Fails unless nothing was lost, duplicated or reordered, every order settled, and the dead letters are
    /// exactly the expected ones. Prints the ledger line first, and appends it to `log` if given.
    pub fn check(&self, log: Option<&Path>) {
        println!("{self}");
        if let Some(log) = log
            && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(log)
        {
            use std::io::Write;
            let _ = writeln!(file, "{} {self}", chrono::Utc::now().to_rfc3339());
        }
        assert_eq!(self.lost, 0, "{self}");
        assert_eq!(self.unpublished, 0, "{self}");
        assert_eq!(self.duplicate_effects, 0, "{self}");
        assert_eq!(self.reordered, 0, "{self}");
        assert_eq!(self.unsettled, 0, "{self}");
        assert_eq!(self.dead_lettered, self.expected_dead_letters, "{self}");
    }
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "scenario={} orders={} paid={} cancelled={} unsettled={} events={} lost={} unpublished={} \
             duplicate_effects={} duplicates_skipped={} reordered={} dead_lettered={}(expected {}) settle_ms={}",
            self.scenario,
            self.orders,
            self.paid,
            self.cancelled,
            self.unsettled,
            self.events,
            self.lost,
            self.unpublished,
            self.duplicate_effects,
            self.duplicates_skipped,
            self.reordered,
            self.dead_lettered,
            self.expected_dead_letters,
            self.settle_ms
        )?;
        for extra in &self.extra {
            write!(f, " {extra}")?;
        }
        Ok(())
    }
}

/// How long a scenario waits for the shop to settle after its fault.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);

//! The embedded demo: both services in one process, each with its own SQLite database, on the in-process bus;
//! no external service needed. [`Demo::start`] runs them, [`seed`] adds products, [`place_orders`] drives the
//! flow through the HTTP APIs like any client would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::host::ServiceOptions;

use bus_core::{EventBus, GroupName};
use bus_inproc::InProcBus;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::{ClientError, ShopClient};
use crate::config::DatabaseUrl;
use crate::host::{StartError, StatsHandle, listen};
use crate::{Service, catalog, ordering};

/// Where the demo keeps its databases and listens.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Directory of `catalog.db` and `ordering.db`; `None`: a temporary directory removed at exit.
    pub data_dir: Option<PathBuf>,
    /// The catalog's address (default 127.0.0.1:5101; port 0 picks a free one).
    pub catalog_addr: SocketAddr,
    /// The ordering service's address (default 127.0.0.1:5102).
    pub ordering_addr: SocketAddr,
    /// The catalog's and the ordering service's databases, instead of SQLite files in `data_dir` (the fault
    /// suite runs the in-process bus on PostgreSQL this way).
    pub databases: Option<(DatabaseUrl, DatabaseUrl)>,
    /// How both services run (fault injection, relay settings).
    pub options: ServiceOptions,
    /// The in-process bus's settings.
    pub bus: bus_inproc::InProcConfig,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            catalog_addr: catalog::DEFAULT_ADDR.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5101))),
            ordering_addr: ordering::DEFAULT_ADDR.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5102))),
            databases: None,
            options: ServiceOptions::default(),
            bus: bus_inproc::InProcConfig::default(),
        }
    }
}

impl DemoConfig {
    /// Both services on free loopback ports (the system picks them), their databases in `data_dir`: for tests.
    pub fn on_loopback(data_dir: &std::path::Path) -> Self {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        Self { data_dir: Some(data_dir.to_path_buf()), catalog_addr: local, ordering_addr: local, ..Self::default() }
    }
}

/// Both services running in this process.
pub struct Demo {
    /// A client of both APIs.
    pub client: ShopClient,
    /// Where the databases are.
    pub data_dir: PathBuf,
    /// The in-process bus both services share.
    pub bus: InProcBus,
    /// The catalog's figures.
    pub catalog: StatsHandle,
    /// The ordering service's figures.
    pub ordering: StatsHandle,
    stop: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    _temp_dir: Option<tempfile::TempDir>,
}

impl Demo {
    /// Starts both services. Each subscribes before either serves, so no event finds its consumer missing.
    ///
    /// # Errors
    /// An address is taken, or a database cannot be created.
    pub async fn start(config: DemoConfig) -> Result<Self, StartError> {
        let (data_dir, temp_dir) = match config.data_dir {
            Some(dir) => (dir, None),
            None => {
                let temp = tempfile::Builder::new().prefix("bus-demo-").tempdir().map_err(|source| {
                    StartError::Config(crate::config::ConfigError::new(
                        "--data-dir",
                        format!("no temporary directory: {source}"),
                    ))
                })?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        std::fs::create_dir_all(&data_dir).map_err(|e| {
            StartError::Config(crate::config::ConfigError::new("--data-dir", format!("{}: {e}", data_dir.display())))
        })?;
        let catalog_listener = listen(config.catalog_addr).await?;
        let ordering_listener = listen(config.ordering_addr).await?;
        let bus = InProcBus::with_config(config.bus.clone())?;
        let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
        let mut running = Vec::new();
        for (service, listener) in [(Service::Catalog, catalog_listener), (Service::Ordering, ordering_listener)] {
            let name = GroupName::new(service.default_name())?;
            let database = match (&config.databases, service) {
                (Some((catalog, _)), Service::Catalog) => catalog.clone(),
                (Some((_, ordering)), Service::Ordering) => ordering.clone(),
                (None, _) => {
                    let file = data_dir.join(format!("{}.db", service.default_name()));
                    DatabaseUrl::parse(&format!("sqlite://{}", file.display()))
                        .map_err(|reason| StartError::Config(crate::config::ConfigError::new("--data-dir", reason)))?
                }
            };
            let started = service.start(name, &database, shared.clone(), config.options.clone()).await?;
            running.push((started, listener));
        }
        let stop = CancellationToken::new();
        let mut urls = Vec::new();
        let mut figures = Vec::new();
        let mut servers = Vec::new();
        for (service, listener) in running {
            let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: "?".into(), source })?;
            urls.push(format!("http://{addr}"));
            figures.push(service.stats_handle());
            let stop = stop.clone();
            servers.push(tokio::spawn(service.serve(listener, async move { stop.cancelled().await })));
        }
        let ordering = figures.pop().expect("two services");
        let catalog = figures.pop().expect("two services");
        Ok(Self {
            client: ShopClient::new(urls[0].clone(), urls[1].clone()),
            data_dir,
            bus,
            catalog,
            ordering,
            stop,
            servers,
            _temp_dir: temp_dir,
        })
    }

    /// Stops both services gracefully (work in hand is finished), then the bus.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for server in self.servers {
            if let Ok(Err(error)) = server.await {
                tracing::warn!(%error, "HTTP server ended with an error");
            }
        }
        self.bus.shutdown(Duration::from_secs(10)).await;
    }
}

/// The products the demo sells: name, price in cents, initial stock.
pub const PRODUCTS: [(&str, i64, i64); 6] = [
    (".NET Bot Black Hoodie", 1950, 2_000),
    ("Rust Crab Mug", 850, 2_000),
    ("Outbox T-Shirt", 1500, 2_000),
    ("Inbox Sticker Pack", 300, 2_000),
    ("Relay Cap", 1200, 2_000),
    ("Kafka-free Socks", 700, 2_000),
];

/// Creates [`PRODUCTS`] in the catalog (unless it already has items) and waits until ordering's read model has
/// them all. Returns each item's initial stock.
///
/// # Errors
/// A request failed, or the read model did not catch up within 30 s.
pub async fn seed(client: &ShopClient) -> Result<HashMap<Uuid, i64>, ClientError> {
    let mut items = client.items().await?;
    if items.is_empty() {
        for (name, price, stock) in PRODUCTS {
            items.push(client.create_item(name, price, stock).await?);
        }
    }
    let start = std::time::Instant::now();
    while client.products().await?.len() < items.len() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(ClientError::NotSettled(start.elapsed(), "products missing from ordering's read model".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(items.into_iter().map(|i| (i.id, i.stock + i.units_sold)).collect())
}

/// What [`place_orders`] did.
#[derive(Clone, Debug, Default)]
pub struct PlacedOrders {
    /// Orders created.
    pub orders: usize,
    /// Requests repeated with the same `Idempotency-Key` (each answered with the first one's order).
    pub repeated_requests: usize,
    /// Orders from `fail-` buyers (payment declined).
    pub declined_expected: usize,
    /// Orders asking for more than any stock.
    pub over_stock: usize,
}

/// Places `n` orders through the API, `concurrency` at a time: mostly ordinary ones, every 10th from a `fail-`
/// buyer (declined payment → compensation), every 10th asking for more units than any stock (rejected), and
/// every 5th sent twice at once with the same `Idempotency-Key` (must yield one order). `progress` is called
/// once per order.
///
/// A request that gets no answer or a 5xx (the service is restarting) is sent again with the same key for up to
/// `retry_for`: whether or not the first attempt committed, the order exists once.
///
/// # Errors
/// A request failed (for longer than `retry_for`), or two requests with one key got different orders.
pub async fn place_orders(
    client: &ShopClient,
    products: &[Uuid],
    n: usize,
    concurrency: usize,
    retry_for: Duration,
    progress: impl Fn() + Sync,
) -> Result<PlacedOrders, ClientError> {
    let repeated = AtomicUsize::new(0);
    let run = Uuid::now_v7().simple().to_string();
    let results: Vec<Result<(), ClientError>> = futures::stream::iter(0..n)
        .map(|i| {
            let (client, repeated, run, progress) = (client, &repeated, &run, &progress);
            async move {
                let buyer = if i % 10 == 3 { format!("fail-buyer-{}", i % 7) } else { format!("buyer-{}", i % 50) };
                let lines: Vec<(Uuid, i64)> = (0..1 + i % 3)
                    .map(|l| {
                        let product = products[(i * 7 + l * 3) % products.len()];
                        let units = if i % 10 == 7 { 1_000_000 } else { 1 + ((i + l) % 3) as i64 };
                        (product, units)
                    })
                    .collect();
                let key = format!("demo-{run}-{i}");
                let place = || place_with_retry(client, &buyer, &lines, &key, retry_for);
                if i % 5 == 0 {
                    let (a, b) = tokio::join!(place(), place());
                    let (a, b) = (a?, b?);
                    if a.id != b.id {
                        return Err(ClientError::NotSettled(
                            Duration::ZERO,
                            format!("Idempotency-Key {key} gave two orders: {} and {}", a.id, b.id),
                        ));
                    }
                    repeated.fetch_add(1, Ordering::Relaxed);
                } else {
                    place().await?;
                }
                progress();
                Ok(())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(PlacedOrders {
        orders: n,
        repeated_requests: repeated.into_inner(),
        declined_expected: (0..n).filter(|i| i % 10 == 3).count(),
        over_stock: (0..n).filter(|i| i % 10 == 7).count(),
    })
}

async fn place_with_retry(
    client: &ShopClient,
    buyer: &str,
    lines: &[(Uuid, i64)],
    key: &str,
    retry_for: Duration,
) -> Result<crate::client::OrderView, ClientError> {
    let deadline = std::time::Instant::now() + retry_for;
    loop {
        match client.place_order(buyer, lines, Some(key)).await {
            Err(ClientError::Http(_)) | Err(ClientError::Status { status: 500.., .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

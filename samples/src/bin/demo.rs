//! The embedded demo: both sample services in one process, SQLite files, the in-process bus; no external
//! service needed. `demo` serves until Ctrl-C; `demo --orders N` places N orders, waits until every one is
//! settled and prints a summary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use samples::demo::{Demo, DemoConfig, place_orders, seed};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Runs the catalog and ordering sample services in one process (SQLite + in-process bus)")]
struct Args {
    /// Place this many orders, wait until all are settled, print a summary and exit.
    #[arg(long)]
    orders: Option<usize>,
    /// Orders in flight at once with --orders.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Keep the SQLite databases here (default: a temporary directory, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The catalog's address.
    #[arg(long, default_value = samples::catalog::DEFAULT_ADDR)]
    catalog_addr: SocketAddr,
    /// The ordering service's address.
    #[arg(long, default_value = samples::ordering::DEFAULT_ADDR)]
    ordering_addr: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_none() {
        // Per-request logs would drown the progress bar; RUST_LOG=info shows them. SQLite writers queue for the
        // database's one write lock, which sqlx reports as "slow statements": not worth a warning here.
        // SAFETY: set before any other thread reads the environment (the runtime's workers do not).
        unsafe { std::env::set_var("RUST_LOG", "warn,sqlx::query=error") };
    }
    // Spans over OTLP too when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = samples::telemetry::init("demo")?;
    let outcome = run(args).await;
    telemetry.shutdown().await;
    outcome
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = DemoConfig {
        data_dir: args.data_dir,
        catalog_addr: args.catalog_addr,
        ordering_addr: args.ordering_addr,
        ..DemoConfig::default()
    };
    let demo = Demo::start(config).await.context("cannot start the demo")?;
    let client = demo.client.clone();
    let initial = seed(&client).await.context("cannot seed the catalog")?;
    println!("catalog  {}  (GET /items, POST /items, PUT /items/{{id}}/price)", client.catalog);
    println!("ordering {}  (GET /products, POST /orders, GET /orders?buyer=NAME)", client.ordering);
    println!("data     {}", demo.data_dir.display());

    let Some(n) = args.orders else {
        let product = client.products().await?.first().map(|p| p.product_id).unwrap_or_default();
        println!();
        println!("Try:");
        println!("  curl -s {}/items", client.catalog);
        println!(
            "  curl -s -X POST {}/orders -H 'Content-Type: application/json' -H 'Idempotency-Key: my-first-order' \\\n       -d '{{\"buyer\": \"alice\", \"items\": [{{\"product_id\": \"{product}\", \"units\": 2}}]}}'",
            client.ordering
        );
        println!("  curl -s '{}/orders?buyer=alice'", client.ordering);
        println!("  curl -s {}/metrics", client.ordering);
        println!("Ctrl-C stops.");
        samples::shutdown_signal().await;
        demo.shutdown().await;
        return Ok(());
    };

    let started = Instant::now();
    let products: Vec<_> = initial.keys().copied().collect();
    let bar = ProgressBar::new(n as u64).with_style(
        ProgressStyle::with_template("{msg:<10} [{bar:40}] {pos}/{len} {per_sec} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message("placing");
    let placed = place_orders(&client, &products, n, args.concurrency, Duration::ZERO, || bar.inc(1)).await?;
    let placed_in = started.elapsed();
    bar.set_position(0);
    bar.set_message("settling");
    let violations = client
        .wait_consistent(&initial, Duration::from_secs(600), |settled, _| bar.set_position(settled as u64))
        .await
        .context("the orders did not settle")?;
    bar.finish_and_clear();
    let total = started.elapsed();

    let orders = client.orders().await?;
    let count = |status: &str| orders.iter().filter(|o| o.status == status).count();
    let catalog = demo.catalog.stats().await?;
    let ordering = demo.ordering.stats().await?;
    println!();
    println!("{:<34} {:>10}", "orders placed", placed.orders);
    println!("{:<34} {:>10}", "  repeated with same Idempotency-Key", placed.repeated_requests);
    println!("{:<34} {:>10}", "  distinct orders stored", orders.len());
    println!("{:<34} {:>10}", "paid", count("paid"));
    println!("{:<34} {:>10}", "cancelled", count("cancelled"));
    println!("{:<34} {:>10}", "  of which payment declined (fail-)", placed.declined_expected);
    println!("{:<34} {:>10}", "  of which over stock", placed.over_stock);
    println!("{:<34} {:>10}", "events published (catalog)", catalog.published);
    println!("{:<34} {:>10}", "events published (ordering)", ordering.published);
    println!("{:<34} {:>10}", "events handled", catalog.handled + ordering.handled);
    println!("{:<34} {:>10}", "duplicates skipped by the inboxes", catalog.duplicates + ordering.duplicates);
    println!("{:<34} {:>10}", "retries", catalog.retried + ordering.retried);
    println!("{:<34} {:>10}", "dead letters", catalog.dead_lettered + ordering.dead_lettered);
    println!("{:<34} {:>10.2?}", "time to place", placed_in);
    println!("{:<34} {:>10.2?}", "time until all settled", total);
    if violations.is_empty() {
        println!(
            "invariants: ok (every order settled, stock + units_sold = initial stock, prices agree, outboxes empty)"
        );
    } else {
        println!("invariants VIOLATED:");
        for violation in &violations {
            println!("  {violation}");
        }
    }
    demo.shutdown().await;
    anyhow::ensure!(violations.is_empty(), "{} invariant violations", violations.len());
    Ok(())
}

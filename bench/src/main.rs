//! The benchmark harness (DESIGN.md): runs each scenario and, in the same run, its raw baseline, and prints one
//! JSON object per figure on stdout. Progress and tables go to stderr. It never fails on a time.
//!
//! `cargo run --release -p bench -- all` (or a figure's name; `--quick` for a short run).

/// The allocator we recommend for services (see `figures::inproc_dispatch`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod broker;
mod cluster;
mod database;
mod figures;
mod hops;
mod payload;
mod report;

use clap::Parser;

/// Scenarios this harness knows, in the order `all` runs them.
const SCENARIOS: &[&str] = &[
    "inproc_dispatch",
    "producer_commit_cost",
    "consumer_inbox",
    "two_relays",
    "relay_throughput",
    "e2e_latency",
    "relay_rss",
    "relay_takeover",
    "partitioned_throughput",
    "relay_throughput_quorum",
];

#[derive(Parser, Debug)]
#[command(about = "Measures the framework against raw baselines; one JSON line per figure on stdout.")]
struct Args {
    /// `all`, or one scenario: inproc_dispatch, producer_commit_cost, consumer_inbox, two_relays,
    /// relay_throughput (also gives backlog_drain), e2e_latency (p50 and p99), relay_rss, relay_takeover,
    /// partitioned_throughput, relay_throughput_quorum (starts a 3-node RabbitMQ cluster beside the local node).
    scenario: String,
    /// A short run (fewer events), for a quick look.
    #[arg(long)]
    quick: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    if hops::enabled() {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
        tracing_subscriber::registry().with(logs).with(hops::layer()).init();
    } else {
        // Exactly the plain subscriber: disabled spans stay free (a layer of its own would enable them all).
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some(figures::relay_rss::CHILD) {
        let [_, _, schema, exchange, count] = raw.as_slice() else {
            anyhow::bail!("usage: bench {} SCHEMA EXCHANGE COUNT", figures::relay_rss::CHILD);
        };
        return figures::relay_rss::child(schema, exchange, count.parse()?).await;
    }
    if raw.get(1).map(String::as_str) == Some(figures::relay_takeover::CHILD) {
        let [_, _, schema] = raw.as_slice() else {
            anyhow::bail!("usage: bench {} SCHEMA", figures::relay_takeover::CHILD);
        };
        return figures::relay_takeover::child(schema).await;
    }
    let args = Args::parse();
    let selected: Vec<&str> = match args.scenario.as_str() {
        "all" => SCENARIOS.to_vec(),
        name if SCENARIOS.contains(&name) => vec![name],
        name => {
            eprintln!("unknown scenario {name:?}; known: all, {}", SCENARIOS.join(", "));
            std::process::exit(2);
        }
    };
    report::print_machine();
    for scenario in selected {
        let figures = match scenario {
            "inproc_dispatch" => figures::inproc_dispatch::run(args.quick).await?,
            "producer_commit_cost" => figures::producer_commit_cost::run(args.quick).await?,
            "consumer_inbox" => figures::consumer_inbox::run(args.quick).await?,
            "two_relays" => figures::two_relays::run(args.quick).await?,
            "relay_throughput" => figures::relay_throughput::run(args.quick).await?,
            "e2e_latency" => figures::e2e_latency::run(args.quick).await?,
            "relay_rss" => figures::relay_rss::run(args.quick).await?,
            "relay_takeover" => figures::relay_takeover::run(args.quick).await?,
            "partitioned_throughput" => figures::partitioned_throughput::run(args.quick).await?,
            "relay_throughput_quorum" => figures::relay_throughput::run_quorum(args.quick).await?,
            _ => unreachable!("every name in SCENARIOS has a branch"),
        };
        for figure in figures {
            figure.emit()?;
        }
    }
    Ok(())
}

//! `busctl`: see and repair what the framework does (CONTRACT §3).
//!
//! - `busctl outbox status | failed | retry (--id ID | --all)`: the outbox of the service whose database
//!   `--database-url` names (PostgreSQL or SQLite);
//! - `busctl inbox forget --queue Q --type T`: make consumer group Q handle events of type T again when they
//!   are replayed (the first step of rebuilding a read model, with emptying the model);
//! - `busctl dlq list | redrive --queue Q [--id ID]`: a group's dead-letter queue on RabbitMQ (`--amqp-url`);
//! - `busctl replay --queue Q [--from-seq N] [--to-seq M] [--type T]`: re-publish the retained events of the
//!   outbox at `--database-url` to queue Q only, in outbox order.
//!
//! Human tables by default, `--json` for scripts (one JSON document on stdout). Exit status 0 on success, 1 on
//! failure with a one-line reason on stderr, 2 on bad usage.

mod commands;
mod output;
mod target;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "busctl", version, about = "Inspect and repair outboxes, inboxes and dead-letter queues")]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Args, Clone, Debug)]
struct Global {
    /// The service's database: postgres://… or sqlite://…
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// The broker: amqp://user:pass@host:port/vhost
    #[arg(long, env = "AMQP_URL", global = true, hide_env_values = true)]
    amqp_url: Option<String>,
    /// The exchange events are published to.
    #[arg(long, env = "BUS_EXCHANGE", global = true, default_value = "bus.events")]
    exchange: String,
    /// PostgreSQL schema of the outbox tables (default: the connection's search path).
    #[arg(long, global = true)]
    schema: Option<String>,
    /// Prefix of the outbox tables.
    #[arg(long, global = true, default_value = "bus_")]
    table_prefix: String,
    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// The outbox: status, failed events, retry.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// The inbox: forget handled events so that a replay handles them again.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// A consumer group's dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Re-publish retained (published) outbox events to one queue only.
    Replay {
        /// The consumer group (queue) that gets the events.
        #[arg(long)]
        queue: String,
        /// Only events with a sequence number above this one.
        #[arg(long, default_value_t = 0, conflicts_with = "since")]
        from_seq: i64,
        /// Only events enqueued at or after this time (RFC 3339, e.g. 2026-12-02T14:00:00Z).
        #[arg(long, value_parser = parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only events with a sequence number up to this one.
        #[arg(long)]
        to_seq: Option<i64>,
        /// Only events of this type.
        #[arg(long = "type")]
        event_type: Option<String>,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Pending, in flight, failed and published (retained) counts, and the oldest pending age.
    Status,
    /// Events the relay gave up on, with their last error.
    Failed {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Re-queue failed events for publishing.
    Retry {
        /// One event, by id.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<uuid::Uuid>,
        /// Every failed event.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum InboxCommand {
    /// Forget every event of one type that one consumer group handled.
    Forget {
        /// The consumer group (queue).
        #[arg(long)]
        queue: String,
        /// The event type.
        #[arg(long = "type")]
        event_type: String,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// The dead letters of a group: id, type, attempts, reason.
    List {
        /// The consumer group (queue).
        #[arg(long)]
        queue: String,
    },
    /// Deliver dead letters to their group again.
    Redrive {
        /// The consumer group (queue).
        #[arg(long)]
        queue: String,
        /// Only this message id.
        #[arg(long)]
        id: Option<uuid::Uuid>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli.global, cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("busctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_since(value: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{value:?} is not an RFC 3339 time like 2026-12-02T14:00:00Z ({e})"))
}

//! A service's configuration from the environment (CONTRACT §2): `DATABASE_URL`, `AMQP_URL`, `HTTP_ADDR`,
//! `SERVICE_NAME` / `BUS_EXCHANGE` to run side-by-side copies (tests), `BUS_QUEUE_TYPE` (`classic`, the default,
//! or `quorum` for a cluster; `AMQP_URL` may then list every node, comma-separated), and `BUS_PARTITIONS` to partition the
//! service's consumer group (per-key order across many instances, see `docs/partitions.md`), `RELAY_MAX_ATTEMPTS` and
//! `RELAY_RETRY_DELAY_MS` for the relay's retry schedule (events the broker refuses while healthy; transport
//! trouble never spends an attempt), and `FAULT_TRANSIENT_FAILURES` for the fault suite only ([`crate::faults`]).
//! Every value is checked here, before
//! anything starts; a bad one is refused with an error naming the variable, and no error or log ever shows a
//! password.

use std::net::SocketAddr;

use bus_core::{GroupName, MAX_PARTITIONS};
use bus_rabbitmq::{AmqpUrl, RabbitConfig};
pub use outbox::DatabaseUrl;
use outbox::RelayConfig;

/// A refused setting: which variable, and why.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable (or option) at fault.
    pub variable: &'static str,
    /// What is wrong with its value.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(variable: &'static str, reason: impl Into<String>) -> Self {
        Self { variable, reason: reason.into() }
    }
}

/// Everything a service binary reads from its environment.
#[derive(Clone, Debug)]
pub struct ServiceEnv {
    /// Its name: consumer group (queue), event `source`, metrics label. `SERVICE_NAME`, else the binary's.
    pub service: GroupName,
    /// `DATABASE_URL`; default `sqlite://<service>.db`.
    pub database: DatabaseUrl,
    /// The RabbitMQ bus: `AMQP_URL` (default the local broker), exchange `BUS_EXCHANGE` (default `bus.events`).
    pub rabbit: RabbitConfig,
    /// `HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// `BUS_PARTITIONS`: the consumer group's partition count, if partitioned (1 to 64; fixed for the life of the
    /// group on the broker).
    pub partitions: Option<u16>,
    /// The relay's settings: `RELAY_MAX_ATTEMPTS` (default 10) attempts for an event the broker refuses while
    /// healthy, the first retry after `RELAY_RETRY_DELAY_MS` (default 500), doubling up to 5 minutes.
    pub relay: RelayConfig,
    /// `FAULT_TRANSIENT_FAILURES` (`<percent>:<seed>`): fault injection for the fault suite, see
    /// [`crate::faults`]. Never set in production.
    pub transient_faults: Option<crate::faults::TransientFaults>,
}

/// The local broker, used when `AMQP_URL` is not set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

impl ServiceEnv {
    /// Reads the process environment for service `default_service` listening by default on `default_addr`.
    ///
    /// # Errors
    /// The first invalid variable.
    pub fn from_env(default_service: &str, default_addr: &str) -> Result<Self, ConfigError> {
        Self::from_lookup(default_service, default_addr, |name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `var` (for tests).
    ///
    /// # Errors
    /// The first invalid variable.
    pub fn from_lookup(
        default_service: &str,
        default_addr: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let service = var("SERVICE_NAME").unwrap_or_else(|| default_service.to_owned());
        let service = GroupName::new(&service).map_err(|e| ConfigError::new("SERVICE_NAME", e.to_string()))?;
        let database = match var("DATABASE_URL") {
            Some(url) => DatabaseUrl::parse(&url),
            None => DatabaseUrl::parse(&format!("sqlite://{service}.db")),
        }
        .map_err(|reason| ConfigError::new("DATABASE_URL", reason))?;
        let amqp = var("AMQP_URL").unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
        let mut rabbit = RabbitConfig::new(&amqp).map_err(|e| ConfigError::new("AMQP_URL", e.to_string()))?;
        if let Some(exchange) = var("BUS_EXCHANGE") {
            rabbit.exchange = exchange;
        }
        rabbit.connection_name = service.as_str().to_owned();
        if let Some(kind) = var("BUS_QUEUE_TYPE") {
            rabbit.queue_type = match kind.trim() {
                "classic" => bus_rabbitmq::QueueType::Classic,
                "quorum" => bus_rabbitmq::QueueType::Quorum,
                other => {
                    return Err(ConfigError::new("BUS_QUEUE_TYPE", format!("{other:?} is not classic or quorum")));
                }
            };
        }
        rabbit.validate().map_err(|e| ConfigError::new("BUS_EXCHANGE", e.to_string()))?;
        let addr = var("HTTP_ADDR").unwrap_or_else(|| default_addr.to_owned());
        let http_addr = addr
            .parse()
            .map_err(|_| ConfigError::new("HTTP_ADDR", format!("{addr:?} is not an address like 127.0.0.1:5101")))?;
        let partitions = match var("BUS_PARTITIONS") {
            None => None,
            Some(value) => Some(
                value.trim().parse::<u16>().ok().filter(|n| (1..=MAX_PARTITIONS).contains(n)).ok_or_else(|| {
                    ConfigError::new(
                        "BUS_PARTITIONS",
                        format!("{value:?} is not a partition count from 1 to {MAX_PARTITIONS}"),
                    )
                })?,
            ),
        };
        let mut relay = RelayConfig::default();
        if let Some(value) = var("RELAY_MAX_ATTEMPTS") {
            relay.retry.max_attempts =
                value.trim().parse::<u32>().ok().filter(|n| (1..=1_000).contains(n)).ok_or_else(|| {
                    ConfigError::new(
                        "RELAY_MAX_ATTEMPTS",
                        format!("{value:?} is not a number of attempts from 1 to 1000"),
                    )
                })?;
        }
        if let Some(value) = var("RELAY_RETRY_DELAY_MS") {
            let ms = value.trim().parse::<u64>().ok().filter(|ms| (1..=3_600_000).contains(ms)).ok_or_else(|| {
                ConfigError::new(
                    "RELAY_RETRY_DELAY_MS",
                    format!("{value:?} is not a delay in milliseconds from 1 to 3600000"),
                )
            })?;
            relay.retry.initial_delay = std::time::Duration::from_millis(ms);
            relay.retry.max_delay = relay.retry.max_delay.max(relay.retry.initial_delay);
        }
        let transient_faults = match var("FAULT_TRANSIENT_FAILURES") {
            None => None,
            Some(value) => Some(
                crate::faults::TransientFaults::parse(&value)
                    .map_err(|reason| ConfigError::new("FAULT_TRANSIENT_FAILURES", reason))?,
            ),
        };
        Ok(Self { service, database, rabbit, http_addr, partitions, relay, transient_faults })
    }

    /// The broker URL, password hidden.
    pub fn amqp_url(&self) -> &AmqpUrl {
        &self.rabbit.url
    }
}

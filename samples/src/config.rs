//! A service's configuration from the environment (CONTRACT §2): `DATABASE_URL`, `AMQP_URL`, `HTTP_ADDR`,
//! and `SERVICE_NAME` / `BUS_EXCHANGE` to run side-by-side copies (tests). Every value is checked here, before
//! anything starts; a bad one is refused with an error naming the variable, and no error or log ever shows a
//! password.

use std::net::SocketAddr;
use std::str::FromStr;

use bus_core::GroupName;
use bus_rabbitmq::{AmqpUrl, RabbitConfig};

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

/// Where a service keeps its data: PostgreSQL or SQLite, chosen by the URL's scheme.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// `postgres://…` or `postgresql://…`.
    Postgres(sqlx::postgres::PgConnectOptions),
    /// `sqlite://path` (created if missing).
    Sqlite(sqlx::sqlite::SqliteConnectOptions),
}

impl DatabaseUrl {
    /// Parses `url`; errors name `variable`.
    ///
    /// # Errors
    /// An unsupported scheme or an unparsable URL.
    pub fn parse(variable: &'static str, url: &str) -> Result<Self, ConfigError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme).unwrap_or_default();
        // sqlx's parse errors can quote the URL; never echo it (it may hold a password).
        match scheme {
            "postgres" | "postgresql" => sqlx::postgres::PgConnectOptions::from_str(url)
                .map(Self::Postgres)
                .map_err(|_| ConfigError::new(variable, "not a valid PostgreSQL URL (postgres://user@host:port/db)")),
            "sqlite" => sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map(|o| Self::Sqlite(o.create_if_missing(true)))
                .map_err(|_| ConfigError::new(variable, "not a valid SQLite URL (sqlite://path/to/file.db)")),
            _ => Err(ConfigError::new(variable, "expected a postgres://… or sqlite://… URL")),
        }
    }

    /// A description safe to log: the backend and where, never a password.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(o) => format!(
                "PostgreSQL {}@{}:{}/{}",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("(default)")
            ),
            Self::Sqlite(o) => format!("SQLite {}", o.get_filename().display()),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
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
            Some(url) => DatabaseUrl::parse("DATABASE_URL", &url)?,
            None => DatabaseUrl::parse("DATABASE_URL", &format!("sqlite://{service}.db"))?,
        };
        let amqp = var("AMQP_URL").unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
        let mut rabbit = RabbitConfig::new(&amqp).map_err(|e| ConfigError::new("AMQP_URL", e.to_string()))?;
        if let Some(exchange) = var("BUS_EXCHANGE") {
            rabbit.exchange = exchange;
        }
        rabbit.validate().map_err(|e| ConfigError::new("BUS_EXCHANGE", e.to_string()))?;
        let addr = var("HTTP_ADDR").unwrap_or_else(|| default_addr.to_owned());
        let http_addr = addr
            .parse()
            .map_err(|_| ConfigError::new("HTTP_ADDR", format!("{addr:?} is not an address like 127.0.0.1:5101")))?;
        Ok(Self { service, database, rabbit, http_addr })
    }

    /// The broker URL, password hidden.
    pub fn amqp_url(&self) -> &AmqpUrl {
        &self.rabbit.url
    }
}

//! The sample services: **catalog** and **ordering**, the eShopOnContainers flow on this framework, and the
//! embedded **demo** that runs both in one process. They are the worked example of how to build a service:
//!
//! - [`events`]: the integration events, plain serde structs with a type name and a partition key;
//! - [`catalog`] and [`ordering`]: each an HTTP API (axum) whose handlers change the service's database and
//!   enqueue events **in the same transaction** (`outbox.begin()`, `tx.enqueue(&event)`, `tx.commit()`), and
//!   event handlers that run in the **inbox's** transaction (`tx: InboxTransaction<DB>`, `tx.enqueue(..)`), so each event's
//!   effect happens exactly once;
//! - [`host`]: the wiring every service shares: migrations, outbox, inbox, relay, subscription, `/health` and
//!   `/metrics`;
//! - [`config`] and [`database`]: configuration from the environment, checked before anything starts.
//!
//! Each service's SQL is portable, so it runs on PostgreSQL (production) and SQLite (embedded) alike; the
//! backend is chosen at start-up from `DATABASE_URL`.

#![warn(missing_docs)]

pub mod api;
pub mod catalog;
pub mod client;
pub mod config;
pub mod database;
pub mod demo;
pub mod events;
pub mod faults;
pub mod host;
pub mod ordering;
pub mod telemetry;

use std::sync::Arc;

use bus_core::{EventBus, GroupName};

use crate::config::DatabaseUrl;
use crate::host::{RunningService, ServiceOptions, StartError};

/// One of the two sample services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The catalog.
    Catalog,
    /// The ordering service.
    Ordering,
}

impl Service {
    /// Its default name (consumer group, event source).
    pub fn default_name(self) -> &'static str {
        match self {
            Self::Catalog => "catalog",
            Self::Ordering => "ordering",
        }
    }

    /// Its default `HTTP_ADDR`.
    pub fn default_addr(self) -> &'static str {
        match self {
            Self::Catalog => catalog::DEFAULT_ADDR,
            Self::Ordering => ordering::DEFAULT_ADDR,
        }
    }

    /// Opens `database`, runs the migrations and starts the service named `name` on `bus`, its consumer group
    /// and relay set up by `options`.
    ///
    /// # Errors
    /// The database cannot be opened or migrated, or the bus refused the subscription.
    pub async fn start(
        self,
        name: GroupName,
        database: &DatabaseUrl,
        bus: Arc<dyn EventBus>,
        options: ServiceOptions,
    ) -> Result<RunningService, StartError> {
        match database {
            DatabaseUrl::Postgres(connect) => {
                let pool = database::postgres(connect.clone()).await?;
                match self {
                    Self::Catalog => catalog::start(name, pool, bus, options).await,
                    Self::Ordering => ordering::start(name, pool, bus, options).await,
                }
            }
            DatabaseUrl::Sqlite(connect) => {
                let pool = database::sqlite(connect.clone()).await?;
                match self {
                    Self::Catalog => catalog::start(name, pool, bus, options).await,
                    Self::Ordering => ordering::start(name, pool, bus, options).await,
                }
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The `main` of a service binary: logs to stderr and spans over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// ([`telemetry`]), [`run_from_env`], and exit status 1 with a one-line reason on failure.
pub async fn service_main(service: Service) -> std::process::ExitCode {
    let name = std::env::var("SERVICE_NAME").unwrap_or_else(|_| service.default_name().to_owned());
    let telemetry = match telemetry::init(&name) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("{}: {error}", service.default_name());
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = run_from_env(service).await;
    telemetry.shutdown().await;
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}: {error}", service.default_name());
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs `service` as its own process: configuration from the environment (see [`config`]), the RabbitMQ bus,
/// until Ctrl-C or SIGTERM. Prints `<name> listening on http://<addr>` on stdout once it serves.
///
/// # Errors
/// A bad setting (naming the variable), an unreachable database or broker, a taken address.
pub async fn run_from_env(service: Service) -> Result<(), StartError> {
    let env = config::ServiceEnv::from_env(service.default_name(), service.default_addr())?;
    tracing::info!(
        service = %env.service,
        database = %env.database.describe(),
        broker = %env.amqp_url(),
        exchange = %env.rabbit.exchange,
        partitions = ?env.partitions,
        "starting"
    );
    let listener = host::listen(env.http_addr).await?;
    let bus = bus_rabbitmq::RabbitBus::connect(env.rabbit.clone()).await?;
    let options =
        ServiceOptions { partitions: env.partitions, relay: env.relay.clone(), transient_faults: env.transient_faults };
    let running = service.start(env.service.clone(), &env.database, Arc::new(bus.clone()), options).await?;
    let addr =
        listener.local_addr().map_err(|source| StartError::Listen { addr: env.http_addr.to_string(), source })?;
    println!("{} listening on http://{addr}", env.service);
    let served = running.serve(listener, shutdown_signal()).await;
    bus.shutdown().await;
    served.map_err(|source| StartError::Listen { addr: addr.to_string(), source })
}

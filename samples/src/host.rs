//! [`ServiceHost`]: how a service is put together on the framework. Both samples are built the same way:
//!
//! 1. open the database and run the service's own migrations, then the outbox's ([`ServiceHost::new`]);
//! 2. describe what the service consumes: a [`Subscription`] named after the service, one inbox handler per event
//!    type (exactly-once effects in the service's database);
//! 3. [`start`](ServiceHost::start): subscribe (the service's queue exists before anything is published to it),
//!    start the relay (publishes what the service's transactions put in the outbox) and the inbox cleanup, and
//!    add `/health` and `/metrics` to the service's HTTP API;
//! 4. serve until shutdown, then stop consuming, let the relay finish its batch, stop.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bus_core::{BusError, EventBus, GroupName, RetryPolicy, Subscription, SubscriptionHandle};

use crate::faults::TransientFaults;
use outbox::{
    Backend, Inbox, InboxConfig, Outbox, OutboxConfig, OutboxError, RelayConfig, RelayHandle, ServiceMetrics,
    ServiceStats,
};
use sqlx::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The database cannot be opened.
    #[error(transparent)]
    Connect(#[from] crate::database::ConnectError),
    /// The database refused a connection or a migration.
    #[error("database: {0}")]
    Database(#[from] OutboxError),
    /// The service's own migrations failed.
    #[error("database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// The bus refused the subscription or cannot be reached.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    /// The HTTP address cannot be bound.
    #[error("HTTP_ADDR: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// How a service runs, beyond its name, database and bus.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// Splits the service's consumer group into this many partitions (`BUS_PARTITIONS`); none: instances
    /// compete on one queue.
    pub partitions: Option<u16>,
    /// The relay's settings (`RELAY_MAX_ATTEMPTS`, `RELAY_RETRY_DELAY_MS`; the rest at their defaults).
    pub relay: RelayConfig,
    /// Fault injection for the fault suite (`FAULT_TRANSIENT_FAILURES`): handlers fail transiently for a seeded
    /// share of events. `None` (the default) in any real deployment.
    pub transient_faults: Option<crate::faults::TransientFaults>,
}

/// A service's database, outbox, inbox and bus, before it starts consuming and serving.
pub struct ServiceHost<DB: Backend> {
    /// The service's name: its consumer group (queue) and the `source` of its events.
    pub name: GroupName,
    /// Its database.
    pub pool: Pool<DB>,
    /// Where its transactions put the events they publish.
    pub outbox: Outbox<DB>,
    /// Where its event handlers record what they handled.
    pub inbox: Inbox<DB>,
    /// The bus it publishes to and consumes from.
    pub bus: Arc<dyn EventBus>,
    retry: RetryPolicy,
    options: ServiceOptions,
}

impl<DB: Backend> ServiceHost<DB> {
    /// Creates the outbox and inbox tables (idempotent) in `pool`'s database. The service runs its own
    /// migrations before this.
    ///
    /// # Errors
    /// The database cannot be reached, or a migration failed.
    pub async fn new(name: GroupName, pool: Pool<DB>, bus: Arc<dyn EventBus>) -> Result<Self, StartError> {
        let outbox = Outbox::new(pool.clone(), OutboxConfig::new(name.as_str()))?;
        outbox.migrate().await?;
        // The inbox must remember events longer than the bus may redeliver them: checked here.
        let retry = RetryPolicy::default();
        let inbox = Inbox::new(outbox.clone(), InboxConfig::default(), &retry)?;
        Ok(Self { name, pool, outbox, inbox, bus, retry, options: ServiceOptions::default() })
    }

    /// Runs the service with `options` (partitions, relay settings).
    pub fn options(mut self, options: ServiceOptions) -> Self {
        self.options = options;
        self
    }

    /// An empty subscription of this service's consumer group, with the retry policy the inbox was checked
    /// against. Add one handler per event type the service consumes.
    pub fn subscription(&self) -> Subscription {
        let subscription = Subscription::new(self.name.clone()).retry(self.retry.clone());
        match self.options.partitions {
            Some(partitions) => subscription.partitions(partitions),
            None => subscription,
        }
    }

    /// Subscribes, starts the relay and the inbox cleanup, and returns the service ready to serve `api`
    /// (plus `/health` and `/metrics`).
    ///
    /// # Errors
    /// The bus refused the subscription.
    pub async fn start(self, subscription: Subscription, api: Router) -> Result<RunningService, StartError> {
        // Each service counts its own injections, even when two run in one process.
        let faults = self.options.transient_faults.as_ref().map(TransientFaults::counted_apart);
        let subscription = match &faults {
            Some(faults) => subscription.layer(|_, handler| faults.wrap(handler)),
            None => subscription,
        };
        // On a bus whose queues die with the process (the embedded demo's), dead letters live in this database.
        self.bus.keep_dead_letters(&self.name, outbox::DeadLetterTable::new(self.outbox.clone()));
        let subscription = self.bus.subscribe(subscription).await?;
        let relay = self.outbox.relay(self.bus.clone(), self.options.relay.clone())?.spawn();
        let stop = CancellationToken::new();
        let cleanup = self.inbox.spawn_cleanup(stop.clone());
        let metrics =
            ServiceMetrics::new(&self.outbox).relay(relay.monitor()).inbox(&self.inbox).subscription(&subscription);
        let probe: Arc<dyn Probe> = Arc::new(HostProbe { pool: self.pool.clone(), bus: self.bus.clone(), metrics });
        let operations = Router::new()
            .route("/health", get(health))
            .route("/metrics", get(render_metrics))
            .with_state(probe.clone());
        let operations = match faults {
            // Fault injection only: how many failures were injected (the fault suite compares it with the retries).
            Some(faults) => operations.route("/faults", get(move || async move { faults.counts().to_string() })),
            None => operations,
        };
        // Only the API is traced: health probes and scrapes would each be a trace of their own.
        let router = api.layer(axum::middleware::from_fn(trace_request)).merge(operations);
        Ok(RunningService { name: self.name, probe, router, subscription, relay, stop, cleanup })
    }
}

/// A started service: consuming, relaying, and ready to serve its HTTP API.
pub struct RunningService {
    name: GroupName,
    probe: Arc<dyn Probe>,
    router: Router,
    subscription: SubscriptionHandle,
    relay: RelayHandle,
    stop: CancellationToken,
    cleanup: tokio::task::JoinHandle<()>,
}

impl RunningService {
    /// The service's name.
    pub fn name(&self) -> &GroupName {
        &self.name
    }

    /// The service's figures now (what `/metrics` shows).
    ///
    /// # Errors
    /// The database cannot be reached.
    pub async fn stats(&self) -> Result<ServiceStats, OutboxError> {
        self.probe.stats().await
    }

    /// A handle that reads the figures after the service was handed to [`serve`](Self::serve).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle { probe: self.probe.clone() }
    }

    /// Serves the API on `listener` until `shutdown` resolves, then stops gracefully: in-flight requests finish,
    /// consuming stops after the events in hand, the relay publishes and marks its batch.
    ///
    /// # Errors
    /// The HTTP server failed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let served = axum::serve(listener, self.router).with_graceful_shutdown(shutdown).await;
        self.subscription.shutdown().await;
        self.relay.shutdown().await;
        self.stop.cancel();
        let _ = self.cleanup.await;
        tracing::info!(service = %self.name, "stopped");
        served
    }
}

/// Reads a running service's figures (see [`RunningService::stats_handle`]).
#[derive(Clone)]
pub struct StatsHandle {
    probe: Arc<dyn Probe>,
}

impl StatsHandle {
    /// The service's figures now.
    ///
    /// # Errors
    /// The database cannot be reached.
    pub async fn stats(&self) -> Result<ServiceStats, OutboxError> {
        self.probe.stats().await
    }
}

/// Binds `addr`, with an error that names `HTTP_ADDR`.
///
/// # Errors
/// The address is taken or not local.
pub async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_string(), source })
}

/// What `/health` and `/metrics` read, whatever the database.
#[async_trait::async_trait]
trait Probe: Send + Sync {
    async fn health(&self) -> Result<(), String>;
    async fn metrics(&self) -> Result<String, OutboxError>;
    async fn stats(&self) -> Result<ServiceStats, OutboxError>;
}

struct HostProbe<DB: Backend> {
    pool: Pool<DB>,
    bus: Arc<dyn EventBus>,
    metrics: ServiceMetrics<DB>,
}

#[async_trait::async_trait]
impl<DB: Backend> Probe for HostProbe<DB> {
    async fn health(&self) -> Result<(), String> {
        // A connection from the pool proves the database answers (sqlx pings a connection it hands out).
        self.pool.acquire().await.map_err(|e| format!("database: {e}"))?;
        self.bus.health().await.map_err(|e| format!("bus: {e}"))
    }

    async fn metrics(&self) -> Result<String, OutboxError> {
        self.metrics.render().await
    }

    async fn stats(&self) -> Result<ServiceStats, OutboxError> {
        self.metrics.stats().await
    }
}

async fn health(State(probe): State<Arc<dyn Probe>>) -> Response {
    match probe.health().await {
        Ok(()) => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Err(reason) => {
            tracing::warn!(%reason, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "unavailable", "error": reason })))
                .into_response()
        }
    }
}

async fn render_metrics(State(probe): State<Arc<dyn Probe>>) -> Response {
    match probe.metrics().await {
        Ok(text) => ([(header::CONTENT_TYPE, outbox::metrics::CONTENT_TYPE)], text).into_response(),
        Err(error) => crate::api::ApiError::unavailable(&error).into_response(),
    }
}

/// Every request runs in a server span, a child of the caller's `traceparent` (or a new trace), which is the
/// current trace context while it runs: the events it enqueues are its children, so one trace follows the request
/// through the outbox, the broker and the consumers. The response carries the span's `traceparent`.
async fn trace_request(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use bus_core::trace::{SpanContext, open, scope};
    use tracing::Instrument;
    let parent = request.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(SpanContext::parse);
    let span = tracing::info_span!(
        "http_request",
        otel.kind = "server",
        method = %request.method(),
        path = %request.uri().path(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    let context = open(&span, parent);
    let mut response = scope(context, next.run(request)).instrument(span).await;
    if let Ok(value) = header::HeaderValue::from_str(&context.traceparent()) {
        response.headers_mut().insert("traceparent", value);
    }
    response
}

//! [`ServiceMetrics`]: one service's event figures in the Prometheus text format, for a `/metrics` endpoint.
//!
//! The figures come from the framework, not from the service's code: the outbox table (read at each scrape),
//! the relay's counters, the inbox's counters and the counters the bus keeps for each subscription. Every series
//! carries the label `service="<name>"` (the outbox's service name), so services sharing one process (the
//! embedded demo) still report their own figures.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `bus_outbox_pending` | gauge | events committed and not yet published (in flight included) |
//! | `bus_outbox_in_flight` | gauge | pending events claimed by a relay right now |
//! | `bus_outbox_failed` | gauge | events the relay gave up on (kept; `busctl outbox retry`) |
//! | `bus_outbox_scheduled` | gauge | pending events scheduled for later (not due yet) |
//! | `bus_outbox_parked_keys` | gauge | partition keys held behind a failed event (their later events wait) |
//! | `bus_outbox_retained` | gauge | published events still kept for replay |
//! | `bus_outbox_oldest_pending_seconds` | gauge | how long the oldest pending event has been due, 0 when none |
//! | `bus_published_total` | counter | events the relays published (bus confirmed) and marked |
//! | `bus_publish_failures_total` | counter | publish attempts that failed (each retried later or given up) |
//! | `bus_relay_batches_total` | counter | relay batches (claim → publish → confirm → mark) |
//! | `bus_relay_batch_seconds_total` | counter | time spent in those batches, summed: mean batch latency = ratio |
//! | `bus_handled_total` | counter | deliveries handled successfully (duplicates skipped by the inbox included) |
//! | `bus_duplicates_total` | counter | deliveries the inbox skipped because the event was already handled |
//! | `bus_retries_total` | counter | failed handlings scheduled for another attempt |
//! | `bus_dead_lettered_total` | counter | deliveries sent to the dead-letter queue |
//!
//! Counters restart from zero with the process, as Prometheus expects of counters.

use std::sync::Arc;

use bus_core::SubscriptionHandle;
use bus_core::transport::DeliveryCounters;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::backend::Backend;
use crate::error::OutboxError;
use crate::inbox::Inbox;
use crate::outbox::Outbox;
use crate::relay::RelayMonitor;
use crate::row::OutboxStatus;

/// The `Content-Type` of [`ServiceMetrics::render`]'s output (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One service's figures at one moment (see the module's table).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ServiceStats {
    /// The outbox table.
    pub outbox: OutboxStatus,
    /// `bus_published_total`.
    pub published: u64,
    /// `bus_publish_failures_total`.
    pub publish_failures: u64,
    /// `bus_relay_batches_total`.
    pub relay_batches: u64,
    /// `bus_relay_batch_seconds_total`: time spent in batches (claim → publish → confirm → mark), summed.
    pub relay_batch_seconds: f64,
    /// `bus_handled_total`.
    pub handled: u64,
    /// `bus_duplicates_total`.
    pub duplicates: u64,
    /// `bus_retries_total`.
    pub retried: u64,
    /// `bus_dead_lettered_total`.
    pub dead_lettered: u64,
}

/// Collects one service's figures; [`render`](Self::render) them at each scrape.
///
/// ```no_run
/// # async fn example(outbox: outbox::Outbox<sqlx::Sqlite>, inbox: outbox::Inbox<sqlx::Sqlite>,
/// #   relay: outbox::RelayHandle, subscription: bus_core::SubscriptionHandle) -> Result<(), outbox::OutboxError> {
/// let metrics = outbox::ServiceMetrics::new(&outbox)
///     .relay(relay.monitor())
///     .inbox(&inbox)
///     .subscription(&subscription);
/// let text = metrics.render().await?; // serve with outbox::metrics::CONTENT_TYPE
/// assert!(text.contains("bus_outbox_pending"));
/// # Ok(()) }
/// ```
pub struct ServiceMetrics<DB: Backend> {
    outbox: Outbox<DB>,
    relays: Vec<RelayMonitor>,
    inboxes: Vec<Inbox<DB>>,
    subscriptions: Vec<Arc<DeliveryCounters>>,
}

impl<DB: Backend> Clone for ServiceMetrics<DB> {
    fn clone(&self) -> Self {
        Self {
            outbox: self.outbox.clone(),
            relays: self.relays.clone(),
            inboxes: self.inboxes.clone(),
            subscriptions: self.subscriptions.clone(),
        }
    }
}

impl<DB: Backend> ServiceMetrics<DB> {
    /// Metrics of the service that owns `outbox` (its name labels every series).
    pub fn new(outbox: &Outbox<DB>) -> Self {
        Self { outbox: outbox.clone(), relays: Vec::new(), inboxes: Vec::new(), subscriptions: Vec::new() }
    }

    /// Adds a relay's counters (several relays are summed).
    pub fn relay(mut self, relay: RelayMonitor) -> Self {
        self.relays.push(relay);
        self
    }

    /// Adds an inbox's counters.
    pub fn inbox(mut self, inbox: &Inbox<DB>) -> Self {
        self.inboxes.push(inbox.clone());
        self
    }

    /// Adds the counters of a subscription instance.
    pub fn subscription(mut self, subscription: &SubscriptionHandle) -> Self {
        self.subscriptions.push(subscription.counters());
        self
    }

    /// The figures now.
    ///
    /// # Errors
    /// The outbox's status could not be read (database unreachable).
    pub async fn stats(&self) -> Result<ServiceStats, OutboxError> {
        let outbox = self.outbox.status().await?;
        let mut figures = ServiceStats { outbox, ..ServiceStats::default() };
        for relay in self.relays.iter().map(RelayMonitor::stats) {
            figures.published += relay.published;
            figures.publish_failures += relay.publish_failures;
            figures.relay_batches += relay.batches;
            figures.relay_batch_seconds += relay.batch_micros as f64 / 1e6;
        }
        figures.duplicates = self.inboxes.iter().map(|i| i.stats().duplicates).sum();
        for counts in self.subscriptions.iter().map(|c| c.stats()) {
            figures.handled += counts.handled;
            figures.retried += counts.retried;
            figures.dead_lettered += counts.dead_lettered;
        }
        Ok(figures)
    }

    /// The figures now, in the OpenMetrics text format ([`CONTENT_TYPE`]).
    ///
    /// # Errors
    /// The outbox's status could not be read (database unreachable).
    pub async fn render(&self) -> Result<String, OutboxError> {
        let ServiceStats {
            outbox: status,
            published,
            publish_failures,
            relay_batches,
            relay_batch_seconds,
            handled,
            duplicates,
            retried,
            dead_lettered,
        } = self.stats().await?;
        let oldest_seconds = status.oldest_pending_ms.unwrap_or(0).max(0) as f64 / 1000.0;

        let service = self.outbox.config().service.clone();
        let mut registry = Registry::with_labels(std::iter::once(("service".into(), service.into())));
        let mut gauge = |name: &str, help: &str, value: i64| {
            registry.register(name, help, ConstGauge::new(value));
        };
        gauge("bus_outbox_pending", "Events committed and not yet published (in flight included)", status.pending);
        gauge("bus_outbox_in_flight", "Pending events claimed by a relay right now", status.in_flight);
        gauge("bus_outbox_scheduled", "Pending events scheduled for later (not due yet)", status.scheduled);
        gauge("bus_outbox_failed", "Events the relay gave up on, kept until re-queued", status.failed);
        gauge(
            "bus_outbox_parked_keys",
            "Partition keys held behind a failed event: their later events wait until it is re-queued",
            status.parked_keys,
        );
        gauge("bus_outbox_retained", "Published events still kept for replay", status.published);
        registry.register(
            "bus_outbox_oldest_pending_seconds",
            "Age of the oldest pending event (0 when none)",
            ConstGauge::new(oldest_seconds),
        );
        let mut counter = |name: &str, help: &str, value: u64| {
            registry.register(name, help, ConstCounter::new(value));
        };
        counter("bus_published", "Events published by the relays (confirmed by the bus) and marked", published);
        counter("bus_publish_failures", "Publish attempts that failed", publish_failures);
        counter("bus_relay_batches", "Relay batches (claim, publish, confirm, mark)", relay_batches);
        registry.register(
            "bus_relay_batch_seconds",
            "Time spent in relay batches, summed (divide by bus_relay_batches_total for the mean latency)",
            ConstCounter::new(relay_batch_seconds),
        );
        let mut counter = |name: &str, help: &str, value: u64| {
            registry.register(name, help, ConstCounter::new(value));
        };
        counter("bus_handled", "Deliveries handled successfully (inbox duplicates included)", handled);
        counter("bus_duplicates", "Deliveries skipped by the inbox as already handled", duplicates);
        counter("bus_retries", "Failed handlings scheduled for another attempt", retried);
        counter("bus_dead_lettered", "Deliveries sent to the dead-letter queue", dead_lettered);

        let mut text = String::new();
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        Ok(text)
    }
}

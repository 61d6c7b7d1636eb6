//! [`Subscription`]: a consumer group and the handlers it runs, handed to [`EventBus::subscribe`](crate::EventBus::subscribe).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::counters::{DeliveryCounters, DeliveryStats};
use crate::error::BusError;
use crate::event::IntegrationEvent;
use crate::handler::{EnvelopeHandler, Handler, TypedHandler};
use crate::name::{EventTypeName, GroupName};
use crate::retry::RetryPolicy;

/// A consumer group (a service) and its handlers, one per event type.
///
/// Every subscription of one group is an *instance* of that service: instances compete for the group's events
/// (each event is handled by one instance), and every group gets every event it handles (fan-out).
/// The group name is checked when it is made ([`GroupName`]); event type names and settings when the
/// subscription is handed to the bus, which refuses it with the first error.
///
/// ```
/// use bus_core::{DeliveryContext, GroupName, HandlerError, IntegrationEvent, Subscription};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct ProductCreated { name: String }
/// # impl IntegrationEvent for ProductCreated { const TYPE_NAME: &'static str = "ProductCreated"; }
///
/// async fn on_product_created(event: ProductCreated, _ctx: DeliveryContext) -> Result<(), HandlerError> {
///     println!("new product {}", event.name);
///     Ok(())
/// }
///
/// let subscription =
///     Subscription::new(GroupName::from_static("ordering")).on::<ProductCreated, _>(on_product_created).concurrency(8);
/// ```
#[must_use = "hand the subscription to EventBus::subscribe"]
pub struct Subscription {
    group: GroupName,
    handlers: Vec<(String, Arc<dyn EnvelopeHandler>)>,
    timeout: Option<std::time::Duration>,
    retry: Option<RetryPolicy>,
    concurrency: Option<usize>,
    partitions: Option<u16>,
}

/// The most partitions a group may have ([`Subscription::partitions`]).
pub const MAX_PARTITIONS: u16 = 64;

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("group", &self.group)
            .field("event_types", &self.handlers.iter().map(|(t, _)| t).collect::<Vec<_>>())
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// A subscription for consumer group `group` (the service name: `GroupName::from_static("catalog")`, or
    /// [`GroupName::new`] for a name from configuration).
    pub fn new(group: GroupName) -> Self {
        Self { group, handlers: Vec::new(), timeout: None, retry: None, concurrency: None, partitions: None }
    }

    /// Handles events of type `E` with `handler` (an async fn or a [`Handler<E>`]).
    pub fn on<E: IntegrationEvent, H: Handler<E>>(mut self, handler: H) -> Self {
        self.handlers.push((E::TYPE_NAME.to_owned(), Arc::new(TypedHandler::<E, H>::new(handler))));
        self
    }

    /// Handles events of type `event_type` with an untyped handler that receives the raw envelope.
    pub fn on_envelope(mut self, event_type: impl Into<String>, handler: Arc<dyn EnvelopeHandler>) -> Self {
        self.handlers.push((event_type.into(), handler));
        self
    }

    /// Wraps every handler added so far with `layer` (cross-cutting behaviour around handlers, as a tower layer
    /// does: logging, metrics, fault injection in tests). `layer` gets the event type and the handler and returns
    /// the handler to run instead; what it returns is what the bus runs, inside the same consumer span, timeout
    /// and retry policy.
    pub fn layer(mut self, mut layer: impl FnMut(&str, Arc<dyn EnvelopeHandler>) -> Arc<dyn EnvelopeHandler>) -> Self {
        for (event_type, handler) in &mut self.handlers {
            *handler = layer(event_type, handler.clone());
        }
        self
    }

    /// Fails a handling that takes longer than `limit` (a transient failure: retried per the retry policy).
    /// The handler's future is dropped at the limit, so an inbox handler's transaction rolls back. No limit by
    /// default.
    pub fn timeout(mut self, limit: std::time::Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Overrides the bus's retry policy for this group.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Overrides the bus's handler concurrency for this instance (how many events it handles at once).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Splits the group into `partitions` partitions, so that events with the same partition key are handled in
    /// outbox order by the group **however many instances run**: each key hashes to one partition, and each
    /// partition is consumed by one instance at a time; partitions are spread over the live instances and move to
    /// a survivor when one dies. Without partitions, instances compete on one queue and order per key holds only
    /// within an instance.
    ///
    /// The partition count is fixed for the life of the group (see `bus-rabbitmq`'s docs for choosing it). The
    /// in-process bus runs every subscription in one process, where per-key order already holds: it accepts
    /// and ignores the setting.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Validates names and settings and returns the parts (buses call this; see [`crate::transport`]).
    ///
    /// # Errors
    /// [`BusError::InvalidName`] for a bad event type name; [`BusError::InvalidConfig`] for no handler,
    /// two handlers of one type, a zero concurrency, a partition count outside `1..=MAX_PARTITIONS` or an invalid
    /// retry policy.
    pub fn into_spec(self) -> Result<SubscriptionSpec, BusError> {
        let group = self.group;
        if self.handlers.is_empty() {
            return Err(BusError::invalid_config("subscription", format!("group {group} has no handler")));
        }
        let mut handlers = BTreeMap::new();
        for (event_type, handler) in self.handlers {
            let event_type = EventTypeName::new(event_type)?;
            if handlers.insert(event_type.clone(), handler).is_some() {
                return Err(BusError::invalid_config(
                    "subscription",
                    format!("group {group} has two handlers for {event_type}"),
                ));
            }
        }
        if self.concurrency == Some(0) {
            return Err(BusError::invalid_config("concurrency", "must be at least 1"));
        }
        if let Some(partitions) = self.partitions
            && !(1..=MAX_PARTITIONS).contains(&partitions)
        {
            return Err(BusError::invalid_config("partitions", format!("must be between 1 and {MAX_PARTITIONS}")));
        }
        if let Some(retry) = &self.retry {
            retry.validate_for_handlers()?;
        }
        if self.timeout == Some(std::time::Duration::ZERO) {
            return Err(BusError::invalid_config("subscription.timeout", "must be longer than zero"));
        }
        Ok(SubscriptionSpec {
            group,
            handlers,
            retry: self.retry,
            timeout: self.timeout,
            concurrency: self.concurrency,
            partitions: self.partitions,
        })
    }
}

/// A validated [`Subscription`].
pub struct SubscriptionSpec {
    /// The consumer group.
    pub group: GroupName,
    /// One handler per event type.
    pub handlers: BTreeMap<EventTypeName, Arc<dyn EnvelopeHandler>>,
    /// The group's retry policy, if it overrides the bus's.
    pub retry: Option<RetryPolicy>,
    /// The handling time limit ([`Subscription::timeout`]).
    pub timeout: Option<std::time::Duration>,
    /// The instance's concurrency, if it overrides the bus's.
    pub concurrency: Option<usize>,
    /// The group's partition count, if it is partitioned ([`Subscription::partitions`]).
    pub partitions: Option<u16>,
}

/// A running subscription (one instance of a consumer group).
///
/// [`shutdown`](Self::shutdown) stops taking new events, lets the events in hand finish and resolves when they have;
/// events not yet taken stay with the group for its other instances (or a later one). Dropping the handle
/// leaves the subscription running until the bus shuts down.
#[must_use = "dropping the handle leaves the subscription running; keep it to stop it"]
pub struct SubscriptionHandle {
    group: GroupName,
    counters: Arc<DeliveryCounters>,
    stop: Option<BoxFuture<'static, ()>>,
}

impl SubscriptionHandle {
    /// Builds a handle whose [`shutdown`](Self::shutdown) runs `stop` (buses call this). `counters` are the ones the bus
    /// updates for this instance only.
    pub fn new(group: GroupName, counters: Arc<DeliveryCounters>, stop: BoxFuture<'static, ()>) -> Self {
        Self { group, counters, stop: Some(stop) }
    }

    /// What this instance did so far: events it handled, retried and dead-lettered (`published` stays 0).
    pub fn stats(&self) -> DeliveryStats {
        self.counters.stats()
    }

    /// This instance's live counters, for a metrics collector that reads them ([`DeliveryCounters::stats`])
    /// for as long as it likes: they outlive the handle (the `outbox` crate's `ServiceMetrics` does).
    #[doc(hidden)]
    pub fn counters(&self) -> Arc<DeliveryCounters> {
        self.counters.clone()
    }

    /// The consumer group.
    pub fn group(&self) -> &GroupName {
        &self.group
    }

    /// Stops this instance gracefully: no new events, in-flight ones finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            stop.await;
        }
    }
}

impl fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionHandle").field("group", &self.group).finish_non_exhaustive()
    }
}

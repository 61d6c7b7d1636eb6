//! [`RabbitBus`]: the [`EventBus`] on RabbitMQ.

use std::sync::Arc;

use async_trait::async_trait;
use bus_core::transport::Dispatcher;
use bus_core::{
    BusError, Confirmation, DeadLetter, DeadLetterQueue, Envelope, EventBus, GroupName, Subscription,
    SubscriptionHandle,
};
use lapin::options::BasicPublishOptions;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RabbitConfig;
use crate::confirms::Outcome;
use crate::consumer::Instance;
use crate::link::{Link, transport};
use crate::publish_order::{Answer, PublishOrder};
use crate::stats::{RabbitStats, Stats};
use crate::{dead_letters, topology, wire};

/// How long a publish waits for the broker's answer before it counts as lost.
const CONFIRM_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(30);

/// How long declaring a group at subscribe may take once connected (64 quorum partitions on a cluster included).
const DECLARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long [`RabbitBus::shutdown`] waits for the broker's answers to the publishes in flight.
pub const SHUTDOWN_CONFIRM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest retry schedule a subscription may have (see [`bus_core::MAX_RETRY_HORIZON`]).
pub const MAX_IN_PLACE_RETRY_HORIZON: std::time::Duration = bus_core::MAX_RETRY_HORIZON;

/// The RabbitMQ event bus. Cheap to clone: clones share one connection. Call [`shutdown`](Self::shutdown)
/// before exiting.
#[derive(Clone)]
pub struct RabbitBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<RabbitConfig>,
    link: Arc<Link>,
    window: Arc<Semaphore>,
    stats: Arc<Stats>,
    /// Stops publishing and consuming (first step of [`RabbitBus::shutdown`]).
    stop: CancellationToken,
    /// Closes the connection: only once the consumers finished and the confirms in flight are answered.
    link_stop: CancellationToken,
    consumers: TaskTracker,
    partitioned: std::sync::Mutex<std::collections::HashMap<GroupName, bool>>,
    order: PublishOrder,
}

impl std::fmt::Debug for RabbitBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBus").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl RabbitBus {
    /// Validates `config`, connects, and declares the exchange; waits up to `publish_timeout` for the broker.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming the setting; [`BusError::Transport`] naming the (redacted) URL when the
    /// broker does not answer in time.
    pub async fn connect(config: RabbitConfig) -> Result<Self, BusError> {
        config.validate()?;
        let config = Arc::new(config);
        let (stop, link_stop) = (CancellationToken::new(), CancellationToken::new());
        let link = Link::start(config.clone(), link_stop.clone());
        if let Err(error) = link.session(config.publish_timeout).await {
            link_stop.cancel();
            return Err(error);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                window: Arc::new(Semaphore::new(config.confirm_window)),
                config,
                link,
                stats: Arc::default(),
                stop,
                link_stop,
                consumers: TaskTracker::new(),
                partitioned: std::sync::Mutex::default(),
                order: PublishOrder::default(),
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RabbitConfig {
        &self.inner.config
    }

    /// This process's counters.
    pub fn stats(&self) -> RabbitStats {
        RabbitStats::new(&self.inner.stats, self.inner.link.connections())
    }

    /// True while connected to the broker.
    pub async fn is_connected(&self) -> bool {
        self.inner.link.session(std::time::Duration::ZERO).await.is_ok()
    }

    /// Stops gracefully, in this order: new publishes and subscriptions are refused and every subscription
    /// stops taking deliveries; the deliveries in hand are finished and acknowledged (partitioned instances hand
    /// their partitions over and say they leave); the publishes in flight get their broker's answer (at most
    /// [`SHUTDOWN_CONFIRM_WAIT`]; one still unanswered then resolves as lost); only then is the connection closed.
    /// So a deploy redelivers nothing that was finished here.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.stop.cancel();
        inner.consumers.close();
        inner.consumers.wait().await;
        let window = u32::try_from(inner.config.confirm_window).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(SHUTDOWN_CONFIRM_WAIT, inner.window.acquire_many(window)).await;
        if drained.is_err() {
            tracing::warn!(wait = ?SHUTDOWN_CONFIRM_WAIT, "publishes still unanswered at shutdown: they count as lost");
        }
        inner.link_stop.cancel();
        inner.link.closed().await;
    }
}

impl RabbitBus {
    /// Publishes `envelope` to the queue of `group` only (through the default exchange), not to every group
    /// subscribed to its type: for replaying events to one service that rebuilds a read model. For a
    /// partitioned group it goes through `<group>.partitions`, to the partition of its key, so replayed events
    /// keep their order per key. Same wire format, confirms and `mandatory` flag as
    /// [`publish`](EventBus::publish): a group without a queue is [`BusError::Unroutable`].
    ///
    /// # Errors
    /// As `publish`.
    pub async fn publish_to_group(&self, group: &GroupName, envelope: Envelope) -> Result<Confirmation, BusError> {
        let partitioned = self.is_partitioned(group).await?;
        let exchange = topology::partition_exchange(group);
        let route = if partitioned { Route::Partitions(&exchange) } else { Route::Queue(group.as_str()) };
        self.send(route, envelope).await
    }

    /// Whether `group` is partitioned on the broker; asked once per group and remembered.
    async fn is_partitioned(&self, group: &GroupName) -> Result<bool, BusError> {
        if let Some(known) = self.inner.partitioned.lock().unwrap_or_else(|p| p.into_inner()).get(group) {
            return Ok(*known);
        }
        let session = self.inner.link.session(self.inner.config.publish_timeout).await?;
        let partitioned = topology::is_partitioned(&session.connection, group).await?;
        self.inner.partitioned.lock().unwrap_or_else(|p| p.into_inner()).insert(group.clone(), partitioned);
        Ok(partitioned)
    }

    async fn send(&self, route: Route<'_>, envelope: Envelope) -> Result<Confirmation, BusError> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(BusError::Closed);
        }
        envelope.check_payload_limit(inner.config.max_payload_bytes)?;
        let (id, key) = (envelope.id(), envelope.partition_key().map(str::to_owned));
        // Until the fence lets it through, an end of any kind (no connection, a caller's future dropped while it
        // waits) leaves it unsent: its key waits for it.
        let not_yet_cleared = Unsent { order: &inner.order, key: key.as_deref(), id };
        let session = inner.link.session(inner.config.publish_timeout).await?;
        let generation = session.generation;
        let permit = inner.window.clone().acquire_owned().await.map_err(|_| BusError::Closed)?;
        // Resolved with the broker's answer below; dropped on the way (the caller's future cancelled), as lost.
        let cleared = inner.order.clear(key.as_deref(), id, generation, inner.config.publish_timeout).await?;
        std::mem::forget(not_yet_cleared);
        let published = session
            .publisher
            .publish(
                match route {
                    Route::Exchange => inner.config.exchange.as_str(),
                    Route::Queue(_) => "",
                    Route::Partitions(exchange) => exchange,
                },
                match route {
                    Route::Exchange => envelope.event_type().as_str(),
                    Route::Queue(queue) => queue,
                    Route::Partitions(_) => "",
                },
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                envelope.payload().clone(),
                wire::properties(&envelope),
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(error) => {
                cleared.resolve(Answer::Lost);
                inner.link.report_trouble();
                return Err(transport(error));
            }
        };
        let (event_type, inner) = (envelope.event_type().to_string(), self.inner.clone());
        // The broker's answer is awaited here, not by whoever holds the confirmation: the window permit must come
        // back when the broker answers, even if the caller publishes a whole batch before awaiting any of them.
        let (answer_tx, confirmation) = bus_core::transport::confirmation_channel();
        tokio::spawn(async move {
            // Bounded: a confirm that never comes (a half-dead connection) must still resolve, or the publish
            // order fence would hold the next connection's publishes for good.
            let answer = tokio::time::timeout(CONFIRM_GIVE_UP, confirm).await;
            drop(permit);
            let result = match answer {
                Ok(Ok(Outcome::Confirmed)) => {
                    inner.stats.count_published();
                    Ok(())
                }
                Ok(Ok(Outcome::Returned)) => Err(BusError::Unroutable { event_type }),
                Ok(Ok(Outcome::Nacked)) => Err(BusError::Nacked { event_id: id, reason: "basic.nack".into() }),
                Ok(Ok(Outcome::Unchecked)) => {
                    inner.link.report_trouble();
                    Err(BusError::ConfirmationLost(
                        "acknowledged, but whether it was returned could not be checked".into(),
                    ))
                }
                Ok(Ok(Outcome::NotRequested)) => {
                    Err(BusError::ConfirmationLost("publisher confirms are not enabled".into()))
                }
                Ok(Ok(Outcome::Failed(error))) => {
                    inner.link.report_trouble();
                    Err(BusError::ConfirmationLost(error.to_string()))
                }
                Ok(Err(_)) => {
                    inner.link.report_trouble();
                    Err(BusError::ConfirmationLost("the channel's confirm path ended".into()))
                }
                Err(_) => {
                    inner.link.report_trouble();
                    Err(BusError::ConfirmationLost(format!("no answer from the broker within {CONFIRM_GIVE_UP:?}")))
                }
            };
            let answer = match &result {
                Ok(()) => Answer::Confirmed,
                // A nacked event is not in the queue: like a lost one, it holds back the later events of its key
                // until it is published again.
                Err(BusError::ConfirmationLost(_) | BusError::Nacked { .. }) => Answer::Lost,
                Err(_) => Answer::Other,
            };
            cleared.resolve(answer);
            let _ = answer_tx.send(result);
        });
        Ok(confirmation)
    }
}

/// Marks event `id` of key `key` unsent when dropped (see [`PublishOrder::unsent`]); forgotten once the fence let
/// the publish through.
struct Unsent<'a> {
    order: &'a PublishOrder,
    key: Option<&'a str>,
    id: uuid::Uuid,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.order.unsent(self.key, self.id);
    }
}

/// Where a publish goes: the topic exchange (every subscribed group), one group's queue, or one partitioned
/// group's headers exchange (the partition of the event's key).
#[derive(Clone, Copy)]
enum Route<'a> {
    Exchange,
    Queue(&'a str),
    Partitions(&'a str),
}

#[async_trait]
impl EventBus for RabbitBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        self.send(Route::Exchange, envelope).await
    }

    async fn health(&self) -> Result<(), BusError> {
        if self.inner.stop.is_cancelled() {
            return Err(BusError::Closed);
        }
        self.inner.link.session(std::time::Duration::ZERO).await.map(drop)
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        let spec = subscription.into_spec()?;
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(BusError::Closed);
        }
        let retry = spec.retry.clone().unwrap_or_else(|| inner.config.retry.clone());
        retry.validate_for_handlers()?;
        // Bounded: while the broker is unreachable, subscribing fails after `publish_timeout` as publishing does
        // (declaring the group, once connected, may take longer: it is not bounded by it).
        if let Err(error) = inner.link.session(inner.config.publish_timeout).await {
            return Err(match error {
                BusError::Transport(reason) => {
                    BusError::Transport(format!("{reason}: group {} not subscribed", spec.group).into())
                }
                other => other,
            });
        }
        let counters = Arc::new(Stats::with_parent(inner.stats.clone()));
        let instance = Arc::new(Instance {
            config: inner.config.clone(),
            link: inner.link.clone(),
            group: spec.group.clone(),
            dispatcher: Dispatcher::new(&spec, retry),
            concurrency: spec.concurrency.unwrap_or(inner.config.concurrency),
            stats: counters.clone(),
            partitions: spec.partitions,
            member_id: format!("{}-{}", spec.group, uuid::Uuid::now_v7().simple()),
            in_place: Default::default(),
        });
        let stop = inner.stop.child_token();
        let (ready_tx, ready) = oneshot::channel();
        let task = inner.consumers.spawn(instance.run(stop.clone(), ready_tx));
        // The connection may also go between that check and the declaration: a generous bound covers that too.
        match tokio::time::timeout(inner.config.publish_timeout + DECLARE_TIMEOUT, ready).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => return Err(error),
            Ok(Err(_)) => return Err(BusError::Closed),
            Err(_) => {
                stop.cancel();
                return Err(BusError::Transport(
                    format!("group {} could not be declared on RabbitMQ at {} in time", spec.group, inner.config.url)
                        .into(),
                ));
            }
        }
        Ok(SubscriptionHandle::new(
            spec.group,
            counters,
            Box::pin(async move {
                stop.cancel();
                let _ = task.await;
            }),
        ))
    }
}

#[async_trait]
impl DeadLetterQueue for RabbitBus {
    /// The oldest [`MAX_LISTED_DEAD_LETTERS`](crate::MAX_LISTED_DEAD_LETTERS) of `<group>.dlq` (they stay in it).
    async fn dead_letters(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError> {
        let session = self.inner.link.session(self.inner.config.publish_timeout).await?;
        dead_letters::list(&session, group, self.inner.config.max_payload_bytes).await
    }

    async fn redrive(&self, group: &GroupName, id: Option<uuid::Uuid>) -> Result<usize, BusError> {
        let session = self.inner.link.session(self.inner.config.publish_timeout).await?;
        dead_letters::redrive(&session, group, id).await
    }
}

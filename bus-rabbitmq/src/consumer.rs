//! One subscription instance: consumes its group's queue (or its partitions) and acknowledges each delivery only
//! once its fate is sealed: handled, or safely moved to `<group>.retry` / `<group>.dlq` (those publishes are
//! broker-confirmed first). Deliveries with the same partition key are handled one after the other in arrival
//! order; others in parallel, up to the instance's concurrency. If a delivery cannot be settled (the retry or
//! dead-letter publish fails), it and the later deliveries of its key stay unacknowledged and the consumption
//! restarts on a new channel: closing the old one returns them to the queue in order (at worst redelivered; the
//! inbox drops duplicates). A keyed event, and any event of a partitioned group, retries in place (the delivery
//! stays unacknowledged through its delays, without holding a handler permit), so that the later events of its
//! key never overtake it while other keys go on; a keyless event of an unpartitioned group retries through
//! `<group>.retry`. The attempts reached in place survive a restart of the consumption in this process.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bus_core::BusError;
use bus_core::transport::Dispatcher;
use bus_core::{EventTypeName, GroupName};
use futures::StreamExt;
use futures::future::Shared;
use lapin::options::ConfirmSelectOptions;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RabbitConfig;
use crate::confirms::ConfirmedChannel;
use crate::link::{Link, Session};
use crate::stats::Stats;
use crate::topology;
use attempts::InPlaceAttempts;
mod attempts;
mod key_order;
mod partitions;
mod settlement;

pub(crate) struct Instance {
    pub(crate) config: Arc<RabbitConfig>,
    pub(crate) link: Arc<Link>,
    pub(crate) group: GroupName,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) concurrency: usize,
    pub(crate) stats: Arc<Stats>,
    /// The group's partition count, if it is partitioned.
    pub(crate) partitions: Option<u16>,
    /// This instance's id among the group's members (partitioned groups), the same across reconnections.
    pub(crate) member_id: String,
    /// Where the events it retries in place stand, across restarts of its consumption.
    pub(crate) in_place: InPlaceAttempts,
}

type KeyTails = Mutex<HashMap<String, Shared<oneshot::Receiver<bool>>>>;

/// What a queue consumer does with the deliveries it holds when it is told to stop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// Cancel the subscription at once (the broker gives new messages to the other instances), then finish the
    /// deliveries in hand: for a queue shared by competing instances, where no order is promised across them.
    Cancel,
    /// Keep the subscription until every delivery in hand is finished, then close the channel: the broker puts
    /// what was prefetched but not started back in its place *before* the next single active consumer gets
    /// anything, so a partition changes hands without reordering.
    InOrder,
}

impl Instance {
    /// Consumes until `stop`, reconnecting as needed. `ready` learns the outcome of the first attempt to start.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken, ready: oneshot::Sender<Result<(), BusError>>) {
        let mut ready = Some(ready);
        let (first, longest) = self.config.reconnect_delay;
        let mut delay = first;
        // A dead connection is never healthy, so this waits for the next one; a live one whose channel failed
        // is reused.
        while let Some(session) = self.link.next_session(&stop).await {
            let started = std::time::Instant::now();
            match self.consume(&session, &stop, &mut ready).await {
                Ok(()) => return,
                Err(error) => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(Err(error));
                        return;
                    }
                    if started.elapsed() > longest {
                        // It ran fine for a while: this is a new trouble, not the same one again.
                        delay = first;
                    }
                    tracing::warn!(group = %self.group, %error, ?delay, "consumer interrupted; resuming on the next connection");
                    self.link.report_trouble();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(crate::link::jittered(delay)) => {}
                    }
                    delay = (delay * 2).min(longest);
                }
            }
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Err(BusError::Closed));
        }
    }

    /// One consumption on one connection: declares the group, then consumes its queue, or its partitions.
    /// `Ok` only when stopped on purpose.
    async fn consume(
        self: &Arc<Self>,
        session: &Arc<Session>,
        stop: &CancellationToken,
        ready: &mut Option<oneshot::Sender<Result<(), BusError>>>,
    ) -> Result<(), BusError> {
        let transport = crate::link::transport;
        let declarer = session.connection.create_channel().await.map_err(transport)?;
        let side = session.connection.create_channel().await.map_err(transport)?;
        side.confirm_select(ConfirmSelectOptions::default()).await.map_err(transport)?;
        let side = ConfirmedChannel::new(side);
        let event_types: BTreeSet<EventTypeName> = self.dispatcher.event_types().cloned().collect();
        match self.partitions {
            None => {
                topology::declare_group(&declarer, &self.config, &self.group, &event_types).await.map_err(transport)?
            }
            Some(partitions) => {
                topology::declare_partitioned_group(&declarer, &self.config, &self.group, &event_types, partitions)
                    .await?
            }
        }
        topology::unbind_stale(&declarer, &self.config, &self.group, &event_types, self.partitions.is_some())
            .await
            .map_err(transport)?;
        let _ = declarer.close(200, "OK".into()).await;
        let refresher = tokio::spawn(self.clone().refresh_bindings(session.clone(), event_types.clone()));
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let outcome = match self.partitions {
            None => {
                tracing::info!(group = %self.group, generation = session.generation, "consuming");
                let queue = self.group.as_str().to_owned();
                self.consume_queue(session, &queue, FieldTable::default(), &side, &permits, stop, Handover::Cancel)
                    .await
            }
            Some(partitions) => partitions::run(self, session, &side, &permits, stop, partitions).await,
        };
        refresher.abort();
        let _ = side.channel().close(200, "OK".into()).await;
        outcome
    }

    /// Every third of `stale_binding_grace`, records again that this instance handles `event_types` (and
    /// unbinds what nobody handles any more), for as long as the session lives.
    async fn refresh_bindings(self: Arc<Self>, session: Arc<Session>, event_types: BTreeSet<EventTypeName>) {
        let period = (self.config.stale_binding_grace / 3).max(std::time::Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            let Ok(channel) = session.connection.create_channel().await else { return };
            let partitioned = self.partitions.is_some();
            if let Err(error) =
                topology::unbind_stale(&channel, &self.config, &self.group, &event_types, partitioned).await
            {
                tracing::debug!(group = %self.group, %error, "bindings not refreshed");
            }
            let _ = channel.close(200, "OK".into()).await;
        }
    }

    /// Consumes `queue` on a channel of its own until `stop` (then hands over as `handover` says and returns
    /// `Ok`) or until the channel or the connection fails, or a delivery cannot be settled. `permits` bound the
    /// handlers running at once across every queue of this instance; retries and dead letters are published on
    /// `side`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn consume_queue(
        self: &Arc<Self>,
        session: &Session,
        queue: &str,
        arguments: FieldTable,
        side: &Arc<ConfirmedChannel>,
        permits: &Arc<Semaphore>,
        stop: &CancellationToken,
        handover: Handover,
    ) -> Result<(), BusError> {
        let transport = crate::link::transport;
        let channel = session.connection.create_channel().await.map_err(transport)?;
        channel.basic_qos(self.config.prefetch, BasicQosOptions::default()).await.map_err(transport)?;
        let tag = format!("{queue}-{}", uuid::Uuid::new_v4().simple());
        let mut deliveries = channel
            .basic_consume(queue.into(), tag.as_str().into(), BasicConsumeOptions::default(), arguments)
            .await
            .map_err(transport)?;
        let tasks = TaskTracker::new();
        let lane = Arc::new(Lane {
            side: side.clone(),
            permits: permits.clone(),
            tails: KeyTails::default(),
            stop: stop.clone(),
            broken: CancellationToken::new(),
        });
        // A connection reset by the peer does not always end the delivery stream: watch the session too.
        let mut health = tokio::time::interval(std::time::Duration::from_millis(250));
        let outcome = loop {
            let next = tokio::select! {
                () = stop.cancelled() => {
                    if handover == Handover::Cancel {
                        // Prefetched deliveries not started return to the queue when the channel closes.
                        let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    }
                    break Ok(());
                }
                () = lane.broken.cancelled() => {
                    break Err(BusError::Transport(
                        "a delivery could not be settled (acknowledgement, retry or dead-letter publish failed); consuming again".into(),
                    ));
                }
                _ = health.tick() => {
                    if session.healthy() && channel.status().connected() {
                        continue;
                    }
                    break Err(BusError::Transport("the connection to the broker was lost".into()));
                }
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(delivery)) => self.dispatch(delivery, &lane, &tasks),
                Some(Err(error)) => break Err(transport(error)),
                None => break Err(BusError::Transport("the broker ended the consumer".into())),
            }
        };
        if outcome.is_err() {
            // Nothing taken from this channel can be acknowledged any more and the broker gives it all to the
            // next consumer: deliveries not started yet must not run here (their effects could land after the
            // next consumer's, out of order). Handlings already running finish; the inbox fences them.
            lane.broken.cancel();
        }
        tasks.close();
        if outcome.is_err() {
            // Handlers or acks stuck on the dead connection: move on; the broker redelivers what was not acked.
            if tokio::time::timeout(std::time::Duration::from_secs(30), tasks.wait()).await.is_err() {
                tracing::warn!(group = %self.group, %queue, "in-flight deliveries did not finish on the lost connection");
            }
        } else if tokio::time::timeout(self.config.stop_timeout, tasks.wait()).await.is_err() {
            // A handler that does not return must not hold the stop for ever: its delivery (and the later ones of
            // its key) go back to the queue, unacknowledged, when the channel closes.
            lane.broken.cancel();
            tracing::warn!(group = %self.group, %queue, stop_timeout = ?self.config.stop_timeout,
                "handlers still running at stop: their deliveries go back to the queue");
        }
        // Closing returns every delivery this channel holds but did not acknowledge, in queue order, and only then
        // lets the queue's next single active consumer in.
        let _ = channel.close(200, "OK".into()).await;
        outcome
    }
}

/// What the deliveries of one queue consumption share.
struct Lane {
    /// The confirm-mode channel for retry and dead-letter publishes.
    side: Arc<ConfirmedChannel>,
    /// Handlers running at once, across the instance.
    permits: Arc<Semaphore>,
    /// Per partition key, the completion of the key's last delivery (`true` if it was settled).
    tails: KeyTails,
    /// The consumption is stopping (shutdown, or the partition is handed over).
    stop: CancellationToken,
    /// A delivery could not be settled: the consumption restarts, so that its channel returns it in order.
    broken: CancellationToken,
}

//! [`InProcBus`]: the [`EventBus`] implementation.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bus_core::transport::Dispatcher;
use bus_core::{
    BusError, Confirmation, DeadLetter, DeadLetterQueue, DeadLetterStore, Envelope, EventBus, EventTypeName, GroupName,
    Subscription, SubscriptionHandle,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfirmOn, InProcConfig};
use crate::group::Group;
use crate::job::Outstanding;
use crate::stats::{InProcStats, Stats};
use crate::worker::Worker;

/// The in-process event bus. Cheap to clone: clones share one bus.
///
/// See the [crate docs](crate) for its semantics. Call [`shutdown`](Self::shutdown) before dropping it.
#[derive(Clone)]
pub struct InProcBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: InProcConfig,
    groups: Mutex<HashMap<GroupName, Arc<Group>>>,
    /// Dead-letter stores by group ([`EventBus::keep_dead_letters`]), for groups not subscribed yet.
    stores: Mutex<HashMap<GroupName, Arc<dyn DeadLetterStore>>>,
    routes: RwLock<HashMap<EventTypeName, Arc<[Arc<Group>]>>>,
    outstanding: Arc<Outstanding>,
    stats: Arc<Stats>,
    closed: AtomicBool,
    stop: CancellationToken,
    workers: TaskTracker,
    /// Every worker task, to abandon those whose handler overruns `stop_timeout`.
    worker_tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    timers: TaskTracker,
}

/// What [`InProcBus::shutdown`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every accepted event was handled or dead-lettered before the grace period ended.
    pub drained: bool,
    /// Jobs still held when the grace period ended; their confirmations resolved to an error (with
    /// [`ConfirmOn::Handled`] the publisher still has them).
    pub abandoned: usize,
}

impl std::fmt::Debug for InProcBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcBus").field("config", &self.inner.config).field("stats", &self.stats()).finish()
    }
}

impl Default for InProcBus {
    fn default() -> Self {
        Self::build(InProcConfig::default())
    }
}

impl InProcBus {
    /// A bus with the default [`InProcConfig`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus with `config`.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming the invalid setting.
    pub fn with_config(config: InProcConfig) -> Result<Self, BusError> {
        config.validate()?;
        Ok(Self::build(config))
    }

    fn build(config: InProcConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                groups: Mutex::new(HashMap::new()),
                stores: Mutex::new(HashMap::new()),
                routes: RwLock::new(HashMap::new()),
                outstanding: Arc::default(),
                stats: Arc::default(),
                closed: AtomicBool::new(false),
                stop: CancellationToken::new(),
                workers: TaskTracker::new(),
                worker_tasks: Arc::default(),
                timers: TaskTracker::new(),
            }),
        }
    }

    /// The bus's settings.
    pub fn config(&self) -> &InProcConfig {
        &self.inner.config
    }

    /// Resolves when every event accepted so far has been handled or dead-lettered by every group it went to
    /// (retries included). Tests use it instead of sleeping. A group with events but no running instance never
    /// settles.
    pub async fn settled(&self) {
        self.inner.outstanding.zero().await;
    }

    /// The bus's counters.
    pub fn stats(&self) -> InProcStats {
        InProcStats::new(&self.inner.stats, self.inner.outstanding.get())
    }

    /// How many events `group` holds now (queued, waiting for their key, in retry delay or in handling);
    /// never more than [`InProcConfig::queue_capacity`]. `None` for an unknown group.
    pub fn queue_depth(&self, group: &GroupName) -> Option<usize> {
        self.group(group).map(|g| g.depth())
    }

    fn group(&self, name: &GroupName) -> Option<Arc<Group>> {
        self.inner.groups.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    fn store(&self, group: &GroupName) -> Option<Arc<dyn DeadLetterStore>> {
        self.inner.stores.lock().unwrap_or_else(|p| p.into_inner()).get(group).cloned()
    }

    /// Stops the bus gracefully: new publishes and subscriptions are refused at once, publishers waiting for
    /// room get [`BusError::Closed`], then accepted events are handled (retries included) for up to `grace`;
    /// then workers stop after the event in hand. Events still held after `grace` are dropped and their
    /// confirmations fail, so with [`ConfirmOn::Handled`] nothing is lost: the publisher (the outbox) keeps
    /// them.
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        self.inner.closed.store(true, Ordering::Release);
        let groups: Vec<Arc<Group>> =
            self.inner.groups.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for group in &groups {
            group.close();
        }
        let drained = tokio::time::timeout(grace, self.settled()).await.is_ok();
        self.inner.stop.cancel();
        self.inner.workers.close();
        self.inner.timers.close();
        if tokio::time::timeout(self.inner.config.stop_timeout, self.inner.workers.wait()).await.is_err() {
            tracing::warn!(stop_timeout = ?self.inner.config.stop_timeout, "handlers still running at shutdown: abandoned");
            abort_all(&self.inner.worker_tasks);
        }
        self.inner.workers.wait().await;
        self.inner.timers.wait().await;
        let abandoned = groups.iter().map(|g| g.abandon_all()).sum();
        if abandoned > 0 {
            tracing::warn!(abandoned, "in-process bus stopped with events not handled; their publishers keep them");
        }
        ShutdownReport { drained, abandoned }
    }

    fn check_open(&self) -> Result<(), BusError> {
        if self.inner.closed.load(Ordering::Acquire) { Err(BusError::Closed) } else { Ok(()) }
    }

    async fn publish_one(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        self.check_open()?;
        envelope.check_payload_limit(self.inner.config.max_payload_bytes)?;
        let groups = self
            .inner
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(envelope.event_type())
            .cloned()
            .ok_or_else(|| BusError::Unroutable { event_type: envelope.event_type().to_string() })?;
        let (ack, confirmation) = match self.inner.config.confirm_on {
            ConfirmOn::Handled => {
                let (countdown, confirmation) = bus_core::transport::Countdown::new(groups.len());
                (Some(countdown), confirmation)
            }
            ConfirmOn::Enqueued => (None, Confirmation::confirmed()),
        };
        let envelope = Arc::new(envelope);
        let handling = crate::worker::handling_group();
        for group in groups.iter() {
            if handling.as_ref() == Some(&group.name) {
                // A handler publishing to its own group: waiting until that group handled the event could be
                // waiting for itself (its key, its worker). Its part is confirmed once queued, as a broker would.
                group.admit(envelope.clone(), None, &self.inner.outstanding, false).await?;
                if let Some(ack) = &ack {
                    ack.part_done();
                }
            } else {
                group.admit(envelope.clone(), ack.clone(), &self.inner.outstanding, true).await?;
            }
        }
        self.inner.stats.count_published();
        Ok(confirmation)
    }
}

#[async_trait]
impl EventBus for InProcBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        self.publish_one(envelope).await
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Vec<Confirmation> {
        let mut confirmations = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            confirmations.push(self.publish_one(envelope).await.unwrap_or_else(Confirmation::failed));
        }
        confirmations
    }

    async fn health(&self) -> Result<(), BusError> {
        self.check_open()
    }

    /// This bus's queues die with its process, so its dead letters are kept in `store` when one is given: a
    /// dead-lettered event counts as done (its confirmation resolves) only once `store` has it, and
    /// [`DeadLetterQueue`] lists and redrives from `store`.
    fn keep_dead_letters(&self, group: &GroupName, store: Arc<dyn DeadLetterStore>) {
        self.inner.stores.lock().unwrap_or_else(|p| p.into_inner()).insert(group.clone(), store.clone());
        if let Some(existing) = self.group(group) {
            existing.keep_dead_letters_in(store);
        }
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        let spec = subscription.into_spec()?;
        self.check_open()?;
        // The same limit as on RabbitMQ: a subscription that works here works there.
        spec.retry.as_ref().unwrap_or(&self.inner.config.retry).validate_for_handlers()?;
        let event_types: BTreeSet<EventTypeName> = spec.handlers.keys().cloned().collect();
        let group = {
            let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
            match groups.get(&spec.group) {
                Some(group) => {
                    if group.event_types != event_types {
                        return Err(BusError::invalid_config(
                            "subscription",
                            format!(
                                "instances of group {} must handle the same event types: it handles {:?}, the new \
                                 instance {:?}",
                                spec.group, group.event_types, event_types
                            ),
                        ));
                    }
                    if spec.retry.as_ref().is_some_and(|r| *r != group.retry) {
                        return Err(BusError::invalid_config(
                            "subscription.retry",
                            format!("instances of group {} must share one retry policy", spec.group),
                        ));
                    }
                    group.clone()
                }
                None => {
                    let retry = spec.retry.clone().unwrap_or_else(|| self.inner.config.retry.clone());
                    let group = Arc::new(Group::new(
                        spec.group.clone(),
                        event_types.clone(),
                        retry,
                        self.inner.config.queue_capacity,
                    ));
                    if let Some(store) = self.store(&spec.group) {
                        group.keep_dead_letters_in(store);
                    }
                    groups.insert(spec.group.clone(), group.clone());
                    let mut routes = self.inner.routes.write().unwrap_or_else(|p| p.into_inner());
                    for event_type in &event_types {
                        let mut targets: Vec<Arc<Group>> =
                            routes.get(event_type).map(|r| r.to_vec()).unwrap_or_default();
                        targets.push(group.clone());
                        routes.insert(event_type.clone(), targets.into());
                    }
                    group
                }
            }
        };
        let dispatcher = Arc::new(Dispatcher::new(&spec, group.retry.clone()));
        let stop = self.inner.stop.child_token();
        let instance = TaskTracker::new();
        let mut tasks = Vec::new();
        let counters = Arc::new(Stats::with_parent(self.inner.stats.clone()));
        for _ in 0..spec.concurrency.unwrap_or(self.inner.config.concurrency) {
            let worker = Worker {
                group: group.clone(),
                dispatcher: dispatcher.clone(),
                stats: counters.clone(),
                stop: stop.clone(),
                bus_stop: self.inner.stop.clone(),
                timers: self.inner.timers.clone(),
            };
            let task = self.inner.workers.spawn(instance.track_future(worker.run()));
            tasks.push(task.abort_handle());
        }
        instance.close();
        group.instance_running(true);
        {
            let mut all = self.inner.worker_tasks.lock().unwrap_or_else(|p| p.into_inner());
            all.retain(|task| !task.is_finished());
            all.extend(tasks.iter().cloned());
        }
        let stop_timeout = self.inner.config.stop_timeout;
        let tasks = Arc::new(Mutex::new(tasks));
        Ok(SubscriptionHandle::new(
            spec.group,
            counters,
            Box::pin(async move {
                stop.cancel();
                if tokio::time::timeout(stop_timeout, instance.wait()).await.is_err() {
                    tracing::warn!(group = %group.name, ?stop_timeout, "handlers still running at stop: abandoned");
                    abort_all(&tasks);
                    instance.wait().await;
                }
                group.instance_running(false);
            }),
        ))
    }
}

impl InProcBus {
    /// Redrives the dead letters kept in `store`: each is queued for `group` again and removed from `store` only
    /// once it is handled (or dead-lettered again: then the new dead letter stays, the removal compares
    /// `failed_at`). A crash before that leaves the dead letter stored: nothing is lost, at worst it is redriven
    /// twice and the inbox drops the duplicate.
    async fn redrive_stored(
        &self,
        name: &GroupName,
        store: &Arc<dyn DeadLetterStore>,
        id: Option<uuid::Uuid>,
    ) -> Result<usize, BusError> {
        let Some(group) = self.group(name) else {
            return Err(BusError::invalid_config(
                "group",
                format!("group {name} has no instance in this process to redrive to"),
            ));
        };
        let mut redriven = 0;
        for letter in store.list(name).await?.into_iter().filter(|l| id.is_none_or(|id| l.is(id))) {
            let Some(envelope) = letter.envelope.clone() else { continue };
            tracing::info!(group = %name, event_id = %envelope.id(), "redriving stored dead letter");
            let (done, handled) = bus_core::transport::Countdown::new(1);
            group.admit(Arc::new(envelope), Some(done), &self.inner.outstanding, true).await?;
            let store = store.clone();
            self.inner.timers.spawn(async move {
                if handled.await.is_ok()
                    && let Err(error) = store.remove(&letter).await
                {
                    tracing::warn!(%error, "a redriven dead letter stays stored (it was handled; a later redrive is a duplicate the inbox drops)");
                }
            });
            redriven += 1;
        }
        Ok(redriven)
    }
}

/// Drops the futures of `tasks` (their handlers stop at their next await point).
fn abort_all(tasks: &Mutex<Vec<tokio::task::AbortHandle>>) {
    for task in tasks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        task.abort();
    }
}

#[async_trait]
impl DeadLetterQueue for InProcBus {
    async fn dead_letters(&self, group: &GroupName) -> Result<Vec<DeadLetter>, BusError> {
        if let Some(store) = self.store(group) {
            return store.list(group).await;
        }
        Ok(self.group(group).map(|g| g.dead_letters()).unwrap_or_default())
    }

    async fn redrive(&self, group: &GroupName, id: Option<uuid::Uuid>) -> Result<usize, BusError> {
        self.check_open()?;
        if let Some(store) = self.store(group) {
            return self.redrive_stored(group, &store, id).await;
        }
        let Some(group) = self.group(group) else { return Ok(0) };
        let mut letters = group.take_dead_letters(id).into_iter();
        let mut redriven = 0;
        while let Some(letter) = letters.next() {
            // Every in-process dead letter holds an event (only valid envelopes enter this bus).
            let Some(envelope) = letter.envelope.clone() else { continue };
            tracing::info!(group = %group.name, event_id = %envelope.id(), "redriving dead letter");
            let envelope = Arc::new(envelope);
            if let Err(error) = group.admit(envelope, None, &self.inner.outstanding, true).await {
                // The bus closed while redriving: the rest stay dead letters, nothing is lost.
                tracing::warn!(group = %group.name, redriven, %error, "redrive interrupted");
                group.restore_dead_letters(std::iter::once(letter).chain(letters));
                return Err(error);
            }
            redriven += 1;
        }
        Ok(redriven)
    }
}

//! A consumer group: its bounded queue, per-key ordering and dead letters.
//!
//! Ordering works with key ownership: the first job of a partition key goes to the ready queue and makes the key
//! *busy*; later jobs of that key wait in the key's own line until the busy one is finished (handled or
//! dead-lettered, its retries included), then the next one goes. Jobs without a key go straight to the ready
//! queue. So one slow or failing key holds back only itself, and any number of workers run different keys.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bus_core::transport::Countdown;
use bus_core::{
    BusError, DeadLetter, DeadLetterCause, DeadLetterStore, EventTypeName, GroupName, HandlerError, RetryPolicy,
};

use crate::job::{Job, Outstanding};

pub(crate) struct Group {
    pub(crate) name: GroupName,
    pub(crate) event_types: BTreeSet<EventTypeName>,
    pub(crate) retry: RetryPolicy,
    capacity: Arc<tokio::sync::Semaphore>,
    queue_capacity: usize,
    ready_tx: async_channel::Sender<Job>,
    pub(crate) ready_rx: async_channel::Receiver<Job>,
    /// Busy partition keys, each with the jobs waiting for it in order.
    keys: Mutex<HashMap<String, VecDeque<Job>>>,
    dead_letters: Mutex<Vec<DeadLetter>>,
    /// Instances of the group running now.
    running: tokio::sync::watch::Sender<usize>,
    /// Where its dead letters are kept durably, if somewhere ([`bus_core::EventBus::keep_dead_letters`]).
    store: std::sync::RwLock<Option<Arc<dyn DeadLetterStore>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // No code path panics while holding these locks; if one ever did, the data is still consistent.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Group {
    pub(crate) fn new(
        name: GroupName,
        event_types: BTreeSet<EventTypeName>,
        retry: RetryPolicy,
        queue_capacity: usize,
    ) -> Self {
        let (ready_tx, ready_rx) = async_channel::unbounded();
        Self {
            name,
            event_types,
            retry,
            capacity: Arc::new(tokio::sync::Semaphore::new(queue_capacity)),
            queue_capacity,
            ready_tx,
            ready_rx,
            keys: Mutex::new(HashMap::new()),
            dead_letters: Mutex::new(Vec::new()),
            running: tokio::sync::watch::channel(0).0,
            store: std::sync::RwLock::new(None),
        }
    }

    /// Admits a job for `envelope`, waiting for a free place in the queue (back-pressure) while the group has a
    /// running instance to make room. A full queue refuses the event at once when no instance runs (nothing
    /// would ever make room), and when `wait` is false (a handler of this very group publishing: waiting could
    /// be waiting for itself).
    pub(crate) async fn admit(
        &self,
        envelope: Arc<bus_core::Envelope>,
        ack: Option<Countdown>,
        outstanding: &Arc<Outstanding>,
        wait: bool,
    ) -> Result<(), BusError> {
        let mut running = self.running.subscribe();
        loop {
            match self.capacity.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    break;
                }
                Err(tokio::sync::TryAcquireError::Closed) => return Err(BusError::Closed),
                Err(tokio::sync::TryAcquireError::NoPermits) => {}
            }
            let instances = *running.borrow_and_update();
            if instances == 0 || !wait {
                let why = if instances == 0 { "has no running instance" } else { "is handling this publish" };
                return Err(BusError::Transport(
                    format!(
                        "the queue of group {} is full ({} events) and the group {why}: event refused",
                        self.name, self.queue_capacity
                    )
                    .into(),
                ));
            }
            tokio::select! {
                permit = self.capacity.acquire() => {
                    permit.map_err(|_| BusError::Closed)?.forget();
                    break;
                }
                // The last instance stopped while this publish waited: look again.
                _ = running.wait_for(|n| *n == 0) => {}
            }
        }
        let job = Job::new(envelope, ack, self.capacity.clone(), outstanding.clone());
        self.enqueue(job);
        Ok(())
    }

    /// An instance of the group starts (`true`) or has stopped (`false`).
    pub(crate) fn instance_running(&self, running: bool) {
        self.running.send_modify(|n| if running { *n += 1 } else { *n = n.saturating_sub(1) });
    }

    /// The job that owned `key` was abandoned (its handler did not finish in time): the key's waiting jobs are
    /// dropped too, so that their confirmations fail with it and the publisher sends them again in their order
    /// (handling them now would let them overtake it).
    pub(crate) fn abandon_key(&self, key: &str) {
        let line = lock(&self.keys).remove(key);
        if let Some(line) = line {
            tracing::warn!(group = %self.name, key, dropped = line.len(), "key abandoned with the handling in hand");
        }
    }

    /// Puts a fresh job in line: ready at once, or behind the busy job of its key.
    fn enqueue(&self, job: Job) {
        if let Some(key) = job.envelope.partition_key() {
            let mut keys = lock(&self.keys);
            if let Some(line) = keys.get_mut(key) {
                tracing::trace!(key, id = %job.envelope.id(), waiting = line.len() + 1, "parked behind its key");
                line.push_back(job);
                return;
            }
            tracing::trace!(key, id = %job.envelope.id(), "key free: ready");
            keys.insert(key.to_owned(), VecDeque::new());
        }
        self.make_ready(job);
    }

    /// Hands a job to the workers (its key, if any, is already owned by it).
    pub(crate) fn make_ready(&self, job: Job) {
        // The receiver lives as long as the group, so the unbounded channel never refuses; if it ever did, the
        // dropped job fails its confirmation instead of passing for handled.
        if self.ready_tx.try_send(job).is_err() {
            tracing::error!(group = %self.name, "in-process queue closed; event returned to its publisher");
        }
    }

    /// The job is done for good: confirm it and let the next job of its key go.
    pub(crate) fn complete(&self, job: Job) {
        let envelope = job.envelope.clone();
        job.finish();
        if let Some(key) = envelope.partition_key() {
            let mut keys = lock(&self.keys);
            let next = match keys.get_mut(key) {
                Some(line) => line.pop_front(),
                None => None,
            };
            tracing::trace!(key, done = %envelope.id(), next = ?next.as_ref().map(|j| j.envelope.id()), "key handoff");
            match next {
                Some(next) => self.make_ready(next),
                None => {
                    keys.remove(key);
                }
            }
        }
    }

    /// Keeps dead letters in `store` from now on.
    pub(crate) fn keep_dead_letters_in(&self, store: Arc<dyn DeadLetterStore>) {
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
    }

    /// Where dead letters are kept durably, if somewhere.
    pub(crate) fn store(&self) -> Option<Arc<dyn DeadLetterStore>> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the job as a dead letter (in the store, if the group has one), then completes it. If the store
    /// refuses it, the job is not completed: its confirmation fails, with those of the later events of its key,
    /// so that the publisher keeps them all.
    pub(crate) async fn dead_letter(&self, job: Job, error: &HandlerError) {
        tracing::warn!(
            group = %self.name,
            event_id = %job.envelope.id(),
            event_type = %job.envelope.event_type(),
            attempts = job.attempt,
            error = %error,
            "event dead-lettered"
        );
        let letter = DeadLetter::of_event(
            (*job.envelope).clone(),
            self.name.clone(),
            error.to_string(),
            DeadLetterCause::of(error),
            job.attempt,
        );
        match self.store() {
            None => lock(&self.dead_letters).push(letter),
            Some(store) => {
                if let Err(store_error) = store.keep(&letter).await {
                    tracing::error!(group = %self.name, event_id = %job.envelope.id(), error = %store_error,
                        "the dead letter could not be stored; the event goes back to its publisher");
                    if let Some(key) = job.envelope.partition_key() {
                        self.abandon_key(key);
                    }
                    return;
                }
            }
        }
        self.complete(job);
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.dead_letters).clone()
    }

    /// Removes the dead letters matching `id` (all if `None`).
    pub(crate) fn take_dead_letters(&self, id: Option<uuid::Uuid>) -> Vec<DeadLetter> {
        let mut dead = lock(&self.dead_letters);
        let (taken, kept) = std::mem::take(&mut *dead).into_iter().partition(|d| id.is_none_or(|id| d.is(id)));
        *dead = kept;
        taken
    }

    /// Puts dead letters back (a redrive that could not finish).
    pub(crate) fn restore_dead_letters(&self, letters: impl IntoIterator<Item = DeadLetter>) {
        lock(&self.dead_letters).extend(letters);
    }

    /// Events the group holds now (queued, waiting for their key, in retry delay, in handling).
    pub(crate) fn depth(&self) -> usize {
        self.queue_capacity.saturating_sub(self.capacity.available_permits())
    }

    /// Refuses new events (publishers waiting for room get [`BusError::Closed`]).
    pub(crate) fn close(&self) {
        self.capacity.close();
    }

    /// Drops every job still held, so their confirmations fail instead of hanging (after the workers stopped).
    pub(crate) fn abandon_all(&self) -> usize {
        let mut abandoned = 0;
        while let Ok(job) = self.ready_rx.try_recv() {
            drop(job);
            abandoned += 1;
        }
        let lines = std::mem::take(&mut *lock(&self.keys));
        abandoned + lines.into_values().map(|line| line.len()).sum::<usize>()
    }
}

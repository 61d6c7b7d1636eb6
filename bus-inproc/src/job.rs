//! One event on its way through one consumer group, and the bookkeeping that travels with it.
//!
//! Everything is RAII so no path can forget it: dropping a [`Job`] gives its queue slot back and lowers the
//! outstanding count; a confirmation whose jobs were all dropped without [`Job::finish`] resolves to an error,
//! never to a false success.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bus_core::{BusError, Envelope};
use tokio::sync::{Notify, Semaphore, oneshot};

/// Events accepted by the bus and not yet handled or dead-lettered, with a wake-up when the count reaches zero.
#[derive(Default)]
pub(crate) struct Outstanding {
    count: AtomicUsize,
    notify: Notify,
}

impl Outstanding {
    pub(crate) fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn increment(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn decrement(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    /// Resolves when the count is zero.
    pub(crate) async fn zero(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// The shared answer to one publish: resolves `Ok` once every group finished its job.
pub(crate) struct Ack {
    remaining: AtomicUsize,
    answer: Mutex<Option<oneshot::Sender<Result<(), BusError>>>>,
}

impl Ack {
    pub(crate) fn new(groups: usize, answer: oneshot::Sender<Result<(), BusError>>) -> Self {
        Self { remaining: AtomicUsize::new(groups), answer: Mutex::new(Some(answer)) }
    }

    fn one_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let answer = self.answer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            if let Some(answer) = answer {
                // The publisher may have stopped waiting; that is its choice.
                let _ = answer.send(Ok(()));
            }
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        let answer = self.answer.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(answer) = answer {
            let _ = answer.send(Err(BusError::ConfirmationLost(
                "the in-process bus stopped before every group handled the event".into(),
            )));
        }
    }
}

/// A place in a group's queue, held from admission until the job is finished or dropped.
struct Slot {
    capacity: Arc<Semaphore>,
    outstanding: Arc<Outstanding>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.capacity.add_permits(1);
        self.outstanding.decrement();
    }
}

/// One event for one group.
pub(crate) struct Job {
    pub(crate) envelope: Arc<Envelope>,
    pub(crate) attempt: u32,
    ack: Option<Arc<Ack>>,
    _slot: Slot,
}

impl Job {
    /// A job holding one permit already taken (and forgotten) from `capacity`.
    pub(crate) fn new(
        envelope: Arc<Envelope>,
        ack: Option<Arc<Ack>>,
        capacity: Arc<Semaphore>,
        outstanding: Arc<Outstanding>,
    ) -> Self {
        outstanding.increment();
        Self { envelope, attempt: 1, ack, _slot: Slot { capacity, outstanding } }
    }

    /// The job is done for good (handled or dead-lettered): counts towards its publish's confirmation.
    pub(crate) fn finish(self) {
        if let Some(ack) = &self.ack {
            ack.one_done();
        }
    }
}

//! One event on its way through one consumer group, and the bookkeeping that travels with it.
//!
//! Everything is RAII so no path can forget it: dropping a [`Job`] gives its queue slot back and lowers the
//! outstanding count; a confirmation whose jobs were all dropped without [`Job::finish`] resolves to an error
//! ([`Countdown`]'s guarantee), never to a false success.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bus_core::Envelope;
use bus_core::transport::Countdown;
use tokio::sync::{Notify, Semaphore};

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
    ack: Option<Countdown>,
    _slot: Slot,
}

impl Job {
    /// A job holding one permit already taken (and forgotten) from `capacity`.
    pub(crate) fn new(
        envelope: Arc<Envelope>,
        ack: Option<Countdown>,
        capacity: Arc<Semaphore>,
        outstanding: Arc<Outstanding>,
    ) -> Self {
        outstanding.increment();
        Self { envelope, attempt: 1, ack, _slot: Slot { capacity, outstanding } }
    }

    /// The job is done for good (handled or dead-lettered): counts towards its publish's confirmation.
    pub(crate) fn finish(self) {
        if let Some(ack) = &self.ack {
            ack.part_done();
        }
    }
}

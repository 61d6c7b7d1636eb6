//! A worker: takes ready jobs of one group and runs the instance's handler on them.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bus_core::{DeliveryContext, EnvelopeHandler, EventTypeName, HandlerError};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::group::Group;
use crate::job::Job;
use crate::stats::Stats;

pub(crate) type Handlers = Arc<BTreeMap<EventTypeName, Arc<dyn EnvelopeHandler>>>;

pub(crate) struct Worker {
    pub(crate) group: Arc<Group>,
    pub(crate) handlers: Handlers,
    pub(crate) stats: Arc<Stats>,
    /// Stops this worker (after the job in hand).
    pub(crate) stop: CancellationToken,
    /// Stops the whole bus: retry timers drop their job instead of requeueing it.
    pub(crate) bus_stop: CancellationToken,
    pub(crate) timers: TaskTracker,
}

impl Worker {
    pub(crate) async fn run(self) {
        loop {
            let job = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                job = self.group.ready_rx.recv() => match job {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            self.process(job).await;
        }
    }

    async fn process(&self, mut job: Job) {
        let result = match self.handlers.get(job.envelope.event_type()) {
            Some(handler) => {
                let ctx = DeliveryContext::new(job.envelope.clone(), job.attempt, self.group.name.clone());
                AssertUnwindSafe(bus_core::trace::consume(&job.envelope, self.group.name.as_str(), handler.handle(ctx)))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(HandlerError::transient(format!("handler panicked: {}", panic_message(&*panic))))
                    })
            }
            None => Err(HandlerError::permanent(format!(
                "group {} has no handler for {}",
                self.group.name,
                job.envelope.event_type()
            ))),
        };
        match result {
            Ok(()) => {
                self.stats.handled();
                self.group.complete(job);
            }
            Err(error) if !error.is_permanent() && self.group.retry.should_retry(job.attempt) => {
                self.stats.retried();
                job.attempt += 1;
                let delay = self.group.retry.delay(job.attempt);
                tracing::debug!(
                    group = %self.group.name,
                    event_id = %job.envelope.id(),
                    attempt = job.attempt,
                    ?delay,
                    %error,
                    "handling failed; retrying"
                );
                let group = self.group.clone();
                let bus_stop = self.bus_stop.clone();
                self.timers.spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(delay) => group.make_ready(job),
                        // Dropping the job fails its confirmation: the publisher keeps the event.
                        () = bus_stop.cancelled() => drop(job),
                    }
                });
            }
            Err(error) => {
                self.stats.dead_lettered();
                self.group.dead_letter(job, &error);
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

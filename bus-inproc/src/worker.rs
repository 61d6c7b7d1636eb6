//! A worker: takes ready jobs of one group and runs the instance's handler on them.

use std::sync::Arc;

use bus_core::GroupName;
use bus_core::transport::{Dispatcher, Verdict};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::group::Group;
use crate::job::Job;
use crate::stats::Stats;

tokio::task_local! {
    /// The group whose handler runs in this task (publishes from a handler to its own group must not wait for
    /// that group).
    static HANDLING: GroupName;
}

/// The group whose handler is running in the current task, if any.
pub(crate) fn handling_group() -> Option<GroupName> {
    HANDLING.try_with(Clone::clone).ok()
}

/// The key of the job being handled, until its verdict is carried out.
struct InHand<'a> {
    group: &'a Group,
    key: Option<String>,
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        if let Some(key) = &self.key {
            self.group.abandon_key(key);
        }
    }
}

pub(crate) struct Worker {
    pub(crate) group: Arc<Group>,
    pub(crate) dispatcher: Arc<Dispatcher>,
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
        // If this future is dropped half-way (the handler overran the stop timeout), the key is given up with it.
        let mut in_hand = InHand { group: &self.group, key: job.envelope.partition_key().map(str::to_owned) };
        let verdict =
            HANDLING.scope(self.group.name.clone(), self.dispatcher.dispatch(&job.envelope, job.attempt)).await;
        in_hand.key = None;
        match verdict {
            Verdict::Handled => {
                self.stats.count_handled();
                self.group.complete(job);
            }
            Verdict::Retry { next_attempt, delay, error } => {
                self.stats.count_retried();
                job.attempt = next_attempt;
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
            Verdict::DeadLetter(error) => {
                self.stats.count_dead_lettered();
                // Storing the dead letter may be cut short too (a stop timeout): the key is given up then.
                self.group.dead_letter(job, &error).await;
            }
        }
        // The verdict is carried out: the key went to its next job, or waits in a retry timer with its job.
        in_hand.key = None;
    }
}

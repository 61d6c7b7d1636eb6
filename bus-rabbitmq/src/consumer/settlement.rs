//! Settling one delivery: acknowledged after its handler succeeded, or after it was confirmed in
//! `<group>.retry` / `<group>.dlq`; left unacknowledged (and its lane marked broken) when that cannot be done,
//! so that the channel's close returns it, in order, to the queue.

use std::sync::Arc;

use bus_core::DeadLetterCause;
use bus_core::transport::Verdict;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;
use tokio::sync::OwnedSemaphorePermit;

use super::{Instance, Lane};
use crate::side_publish::confirmed_publish;
use crate::topology;
use crate::wire::{self, Poison};

impl Instance {
    /// Handles one delivery and settles it: acknowledged after the handler succeeded, or after it was
    /// confirmed in the retry or dead-letter queue. `false` if it was left unacknowledged (the lane is stopping,
    /// or broken because the retry/dead-letter publish failed).
    ///
    /// A keyed event (and any event of a partitioned group) retries in place: the delivery stays
    /// unacknowledged through its delays, so the later events of its key wait behind it; meanwhile `permit` is
    /// given back, so other keys go on. A keyless event of an unpartitioned group retries through
    /// `<group>.retry`.
    pub(super) async fn handle(
        &self,
        delivery: Delivery,
        decoded: Result<bus_core::Envelope, Poison>,
        lane: &Lane,
        mut permit: OwnedSemaphorePermit,
    ) -> bool {
        let mut attempt = wire::attempt(&delivery.properties);
        let envelope = match decoded {
            Ok(envelope) => Arc::new(envelope),
            Err(Poison(reason)) => {
                tracing::warn!(group = %self.group, %reason, "undecodable message dead-lettered");
                return self.dead_letter(&delivery, lane, attempt, &reason, DeadLetterCause::Permanent).await;
            }
        };
        let earlier = wire::earlier_deliveries(&delivery.properties);
        if earlier >= self.config.redelivery_limit {
            let reason = format!(
                "delivered {} times without being settled: it may crash or hang its consumer (redelivery_limit {})",
                earlier + 1,
                self.config.redelivery_limit
            );
            tracing::error!(group = %self.group, event_id = %envelope.id(), %reason, "event dead-lettered");
            let settled = self.dead_letter(&delivery, lane, attempt, &reason, DeadLetterCause::Permanent).await;
            if settled {
                self.in_place.forget(envelope.id());
            }
            return settled;
        }
        let in_place = self.partitions.is_some() || envelope.partition_key().is_some();
        // Only a delivery that comes back (redelivered) goes on where its schedule stood: a new message with the
        // same event id (a redrive, a replay) starts from the attempt it carries.
        let standing = if delivery.redelivered { self.in_place.standing(envelope.id()) } else { None };
        if let Some(standing) = standing.filter(|s| s.next_attempt > attempt) {
            // Back after a restart of the consumption: go on where the schedule stood.
            attempt = standing.next_attempt;
            let wait = standing.due.saturating_duration_since(std::time::Instant::now());
            match self.wait_in_place(lane, permit, wait).await {
                Some(again) => permit = again,
                None => return false,
            }
        }
        loop {
            let (next_attempt, delay, error) = match self.dispatcher.dispatch(&envelope, attempt).await {
                Verdict::Handled => {
                    self.stats.count_handled();
                    self.in_place.forget(envelope.id());
                    ack(&delivery, lane).await;
                    return true;
                }
                Verdict::DeadLetter(error) => {
                    tracing::warn!(group = %self.group, event_id = %envelope.id(), attempt, %error, "event dead-lettered");
                    let settled = self
                        .dead_letter(&delivery, lane, attempt, &error.to_string(), DeadLetterCause::of(&error))
                        .await;
                    if settled {
                        self.in_place.forget(envelope.id());
                    }
                    return settled;
                }
                Verdict::Retry { next_attempt, delay, error } => (next_attempt, delay, error),
            };
            if in_place {
                self.stats.count_retried();
                self.in_place.remember(envelope.id(), next_attempt, delay);
                tracing::debug!(group = %self.group, event_id = %envelope.id(), attempt, ?delay, %error, "handling failed; retrying in place");
                match self.wait_in_place(lane, permit, delay).await {
                    Some(again) => permit = again,
                    // Stopping, handed over or broken: the next consumer gets it (and its key's later events)
                    // back in order.
                    None => return false,
                }
                attempt = next_attempt;
                continue;
            }
            let properties = wire::with_headers(
                &delivery.properties,
                &[
                    (wire::H_ATTEMPT, AMQPValue::LongLongInt(i64::from(next_attempt))),
                    (wire::H_LAST_ERROR, wire::text_header(&error.to_string())),
                    (wire::H_FAILED_AT, wire::now_header()),
                ],
            )
            .with_expiration(delay.as_millis().max(1).to_string().into());
            tracing::debug!(group = %self.group, event_id = %envelope.id(), attempt, ?delay, %error, "handling failed; retrying later");
            if !confirmed_publish(&lane.side, &topology::retry_queue(&self.group), &delivery.data, properties).await {
                lane.broken.cancel();
                return false;
            }
            self.stats.count_retried();
            ack(&delivery, lane).await;
            return true;
        }
    }

    /// Waits `delay` before an attempt in place without holding a handler permit; the permit to run the attempt
    /// with, or `None` if the lane stopped or broke meanwhile.
    async fn wait_in_place(
        &self,
        lane: &Lane,
        permit: OwnedSemaphorePermit,
        delay: std::time::Duration,
    ) -> Option<OwnedSemaphorePermit> {
        drop(permit);
        tokio::select! {
            () = lane.stop.cancelled() => return None,
            () = lane.broken.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        let permit = tokio::select! {
            permit = lane.permits.clone().acquire_owned() => permit.ok()?,
            () = lane.stop.cancelled() => return None,
            () = lane.broken.cancelled() => return None,
        };
        (!lane.stop.is_cancelled() && !lane.broken.is_cancelled()).then_some(permit)
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        lane: &Lane,
        attempt: u32,
        reason: &str,
        cause: DeadLetterCause,
    ) -> bool {
        let properties = wire::with_headers(
            &delivery.properties,
            &[
                (wire::H_ATTEMPT, AMQPValue::LongLongInt(i64::from(attempt))),
                (wire::H_LAST_ERROR, wire::text_header(reason)),
                (wire::H_FAILED_AT, wire::now_header()),
                (wire::H_DEAD_LETTER_CAUSE, wire::text_header(cause.as_str())),
            ],
        );
        if !confirmed_publish(&lane.side, &topology::dead_letter_queue(&self.group), &delivery.data, properties).await {
            lane.broken.cancel();
            return false;
        }
        self.stats.count_dead_lettered();
        ack(delivery, lane).await;
        true
    }
}

/// Acknowledges `delivery`. If that fails the channel is dead: the broker redelivers the delivery (the inbox
/// drops the duplicate) and everything else this channel took, so the lane is marked broken at once.
async fn ack(delivery: &Delivery, lane: &Lane) {
    // On a connection that died without a clean close the ack may never complete: bound it.
    let acked = tokio::time::timeout(ACK_TIMEOUT, delivery.ack(BasicAckOptions::default())).await;
    if !matches!(acked, Ok(Ok(_))) {
        tracing::debug!(?acked, "ack failed; the message will be redelivered");
        lane.broken.cancel();
    }
}

/// How long an acknowledgement may take before the channel is taken for dead.
const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

//! Settling one delivery: acknowledged after its handler succeeded, or after it was confirmed in
//! `<group>.retry` / `<group>.dlq`; left unacknowledged (and its lane marked broken) when that cannot be done,
//! so that the channel's close returns it, in order, to the queue.

use std::sync::Arc;

use bus_core::DeadLetterCause;
use bus_core::transport::Verdict;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::types::AMQPValue;

use super::{Instance, Lane};
use crate::side_publish::confirmed_publish;
use crate::topology;
use crate::wire::{self, Poison};

impl Instance {
    /// Handles one delivery and settles it: acknowledged after the handler succeeded, or after it was
    /// confirmed in the retry or dead-letter queue. `false` if it was left unacknowledged (the lane is stopping,
    /// or broken because the retry/dead-letter publish failed).
    pub(super) async fn handle(
        &self,
        delivery: Delivery,
        decoded: Result<bus_core::Envelope, Poison>,
        lane: &Lane,
    ) -> bool {
        let mut attempt = wire::attempt(&delivery.properties);
        let envelope = match decoded {
            Ok(envelope) => Arc::new(envelope),
            Err(Poison(reason)) => {
                tracing::warn!(group = %self.group, %reason, "undecodable message dead-lettered");
                return self.dead_letter(&delivery, lane, attempt, &reason, DeadLetterCause::Permanent).await;
            }
        };
        loop {
            let (next_attempt, delay, error) = match self.dispatcher.dispatch(&envelope, attempt).await {
                Verdict::Handled => {
                    self.stats.count_handled();
                    ack(&delivery, lane).await;
                    return true;
                }
                Verdict::DeadLetter(error) => {
                    tracing::warn!(group = %self.group, event_id = %envelope.id(), attempt, %error, "event dead-lettered");
                    return self
                        .dead_letter(&delivery, lane, attempt, &error.to_string(), DeadLetterCause::of(&error))
                        .await;
                }
                Verdict::Retry { next_attempt, delay, error } => (next_attempt, delay, error),
            };
            if self.partitions.is_some() {
                // Partitioned: retry in place, so that the later events of its key wait for it.
                self.stats.count_retried();
                tracing::debug!(group = %self.group, event_id = %envelope.id(), attempt, ?delay, %error, "handling failed; retrying in place");
                tokio::select! {
                    // Handed over or stopping: the next owner gets it (and its key's later events) back in order.
                    () = lane.stop.cancelled() => return false,
                    () = lane.broken.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
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
                (wire::H_FIRST_FAILURE, wire::text_header(cause.as_str())),
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

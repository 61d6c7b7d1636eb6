//! Publishing one claimed batch: every key's rows one after the other (the next only once the bus confirmed
//! the previous one), all keys and keyless rows at once, and a verdict for each row.
//!
//! Holding a key's next row until its previous one is confirmed is what keeps per-key order through failures:
//! when a publish fails, nothing later of its key has been sent, so the retry cannot land after its successors.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bus_core::{BusError, Confirmation, Envelope, EventBus};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use uuid::Uuid;

/// What the relay knows of a row while its envelope is with the bus.
#[derive(Clone, Debug)]
pub(super) struct RowMeta {
    pub seq: i64,
    pub event_id: Uuid,
    /// Attempts including this one (claims count them).
    pub attempts: u32,
    pub key: Option<String>,
}

/// A claimed row, ready to publish.
pub(super) struct Ready {
    pub meta: RowMeta,
    pub envelope: Envelope,
}

/// How a publish ended, as the relay must treat it.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The bus confirmed it.
    Published,
    /// The transport was in trouble (no connection, timeout, closed channel, nack while the bus is unhealthy):
    /// not the event's fault, so no attempt is spent.
    Transport(BusError),
    /// The bus refused this event while healthy (unroutable, nacked): an attempt, then backoff.
    Retryable(BusError),
    /// The event can never be published as it is (too large, invalid): failed at once.
    Permanent(BusError),
}

/// The verdicts of a batch, grouped by what the relay writes back.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Confirmed by the bus.
    pub published: Vec<i64>,
    /// Refused by the bus: `true` when permanent.
    pub failed: Vec<(RowMeta, BusError, bool)>,
    /// Not tried, or stopped by transport trouble: given back with their attempt refunded.
    pub released: Vec<i64>,
    /// The first transport error, when one stopped the batch.
    pub transport: Option<BusError>,
}

/// Sorts a bus error into a [`Verdict`]. A nack counts as transport trouble when the bus reports itself
/// unhealthy right after it.
pub(super) async fn verdict(bus: &dyn EventBus, result: Result<(), BusError>) -> Verdict {
    match result {
        Ok(()) => Verdict::Published,
        Err(error @ (BusError::Transport(_) | BusError::ConfirmationLost(_) | BusError::Closed)) => {
            Verdict::Transport(error)
        }
        Err(error @ BusError::Nacked { .. }) => match bus.health().await {
            Ok(()) => Verdict::Retryable(error),
            Err(_) => Verdict::Transport(error),
        },
        Err(error @ BusError::Unroutable { .. }) => Verdict::Retryable(error),
        Err(
            error @ (BusError::PayloadTooLarge { .. }
            | BusError::InvalidEnvelope { .. }
            | BusError::InvalidName { .. }
            | BusError::Serialize { .. }
            | BusError::InvalidConfig { .. }),
        ) => Verdict::Permanent(error),
        // A kind this relay does not know yet: retried with backoff, never dropped.
        Err(error) => Verdict::Retryable(error),
    }
}

fn lost(what: &str, timeout: Duration) -> BusError {
    BusError::ConfirmationLost(format!("{what} did not finish within relay.confirm_timeout ({timeout:?})"))
}

/// Publishes `rows` (in outbox order) and waits for every confirmation (each at most `confirm_timeout`).
/// A key's rows go out one at a time; after a failure the key's later rows are given back untried; after
/// transport trouble nothing more is sent.
pub(super) async fn publish(bus: &dyn EventBus, rows: Vec<Ready>, confirm_timeout: Duration) -> Settled {
    let mut settled = Settled::default();
    let mut waiting: HashMap<String, VecDeque<Ready>> = HashMap::new();
    let mut first = Vec::new();
    for row in rows {
        match row.meta.key.as_ref().and_then(|key| waiting.get_mut(key)) {
            Some(queue) => queue.push_back(row),
            None => {
                if let Some(key) = &row.meta.key {
                    waiting.insert(key.clone(), VecDeque::new());
                }
                first.push(row);
            }
        }
    }
    let (metas, envelopes): (Vec<RowMeta>, Vec<Envelope>) = first.into_iter().map(|r| (r.meta, r.envelope)).unzip();
    let count = envelopes.len();
    let confirmations = match tokio::time::timeout(confirm_timeout, bus.publish_batch(envelopes)).await {
        Ok(confirmations) => confirmations,
        Err(_) => (0..count).map(|_| Confirmation::failed(lost("publishing", confirm_timeout))).collect(),
    };
    let confirmed = |meta: RowMeta, confirmation: Confirmation| async move {
        let result = tokio::time::timeout(confirm_timeout, confirmation)
            .await
            .unwrap_or_else(|_| Err(lost("the confirmation", confirm_timeout)));
        (meta, result)
    };
    let mut in_flight = FuturesUnordered::new();
    for (meta, confirmation) in metas.into_iter().zip(confirmations) {
        in_flight.push(confirmed(meta, confirmation));
    }
    let mut sending = true;
    while let Some((meta, result)) = in_flight.next().await {
        let verdict = verdict(bus, result).await;
        if !matches!(verdict, Verdict::Published) {
            // The key's later rows of this batch must not overtake this one: back, untried.
            if let Some(rest) = meta.key.as_ref().and_then(|key| waiting.remove(key)) {
                settled.released.extend(rest.into_iter().map(|r| r.meta.seq));
            }
        }
        match verdict {
            Verdict::Published => {
                settled.published.push(meta.seq);
                let next = meta.key.as_ref().and_then(|key| waiting.get_mut(key)).and_then(VecDeque::pop_front);
                match next {
                    Some(next) if sending => {
                        let sent = tokio::time::timeout(confirm_timeout, bus.publish(next.envelope)).await;
                        let confirmation = match sent {
                            Ok(Ok(confirmation)) => confirmation,
                            Ok(Err(error)) => Confirmation::failed(error),
                            Err(_) => Confirmation::failed(lost("publishing", confirm_timeout)),
                        };
                        in_flight.push(confirmed(next.meta, confirmation));
                    }
                    Some(next) => settled.released.push(next.meta.seq),
                    None => {}
                }
            }
            Verdict::Transport(error) => {
                settled.released.push(meta.seq);
                settled.transport.get_or_insert(error);
                sending = false;
            }
            Verdict::Retryable(error) => settled.failed.push((meta, error, false)),
            Verdict::Permanent(error) => settled.failed.push((meta, error, true)),
        }
    }
    for (_, rest) in waiting {
        settled.released.extend(rest.into_iter().map(|r| r.meta.seq));
    }
    settled
}

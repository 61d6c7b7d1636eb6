//! Per-key publish order across reconnections: a keyed publish never overtakes an earlier publish of its key that
//! was lost with a connection.
//!
//! On one channel AMQP keeps order. Across a reconnection it would not: a publish sent on the old connection may
//! be lost with it while a later one, sent on the new connection, arrives. The outbox relay publishes an event's
//! successors before the event is confirmed (pipelining), so it relies on this fence:
//! - a publish about to go out on a newer connection first waits until every publish sent on an older one has
//!   its answer (a lost connection answers at once: its pending confirms fail; a confirm that never comes counts
//!   as lost after 30 s);
//! - a publish whose confirmation was lost, that the broker nacked, or that could not be sent (no connection, or
//!   refused by this fence), marks its partition key: until that very event has been published again and confirmed, other
//!   events of the key are refused, unsent, and hold it back in their turn
//!   ([`BusError::ConfirmationLost`](bus_core::BusError::ConfirmationLost)). Held-back events may go again: the
//!   caller publishes them again in their order (the outbox relay does: it claims pending rows in order). A
//!   mark is dropped after [`LOST_KEY_HOLD`] if the event is never published again.
//!
//! Events without a key are never held back: no order is promised for them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_core::BusError;
use tokio::sync::watch;
use uuid::Uuid;

/// How long a lost event holds back the later events of its key if it is never published again.
pub(crate) const LOST_KEY_HOLD: Duration = Duration::from_secs(10 * 60);

/// What the broker said about a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Confirmed: the broker has it.
    Confirmed,
    /// The connection lost it, it could not be sent, or the broker refused it (nack): the queues may not have it.
    Lost,
    /// Any other answer (unroutable: no queue takes it, so no consumer's order depends on it).
    Other,
}

#[derive(Debug)]
struct LostKey {
    events: HashSet<Uuid>,
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Per connection generation, publishes sent there that await the broker's answer.
    unresolved: BTreeMap<u64, usize>,
    /// Keys with an event lost with a connection and not confirmed since.
    lost: HashMap<String, LostKey>,
}

/// The fence (see the module docs). One per bus.
#[derive(Debug)]
pub(crate) struct PublishOrder {
    state: Arc<watch::Sender<State>>,
}

impl Default for PublishOrder {
    fn default() -> Self {
        Self { state: Arc::new(watch::channel(State::default()).0) }
    }
}

/// A publish the fence let through, unresolved until [`Cleared::resolve`] tells what the broker said. Dropped
/// unresolved (the publish was cancelled: its future dropped by a caller's timeout), it resolves as
/// [`Answer::Lost`]: it may or may not have gone out, and it must not keep the next connection waiting.
#[must_use = "resolve it with the broker's answer"]
#[derive(Debug)]
pub(crate) struct Cleared {
    state: Arc<watch::Sender<State>>,
    generation: u64,
    key: Option<String>,
    id: Uuid,
    resolved: bool,
}

impl Cleared {
    /// The broker answered (or the publish could not be sent: [`Answer::Lost`]).
    pub(crate) fn resolve(mut self, answer: Answer) {
        self.resolved = true;
        resolve(&self.state, self.generation, self.key.as_deref(), self.id, answer);
    }
}

impl Drop for Cleared {
    fn drop(&mut self) {
        if !self.resolved {
            resolve(&self.state, self.generation, self.key.as_deref(), self.id, Answer::Lost);
        }
    }
}

impl PublishOrder {
    /// Clears event `id` of key `key` to be sent on connection `generation`: waits (at most `timeout`) until
    /// nothing sent on an older connection awaits an answer, then refuses it if an earlier event of its key was
    /// lost and not published again. On `Ok` the publish counts as unresolved until the [`Cleared`] is resolved
    /// (or dropped).
    pub(crate) async fn clear(
        &self,
        key: Option<&str>,
        id: Uuid,
        generation: u64,
        timeout: Duration,
    ) -> Result<Cleared, BusError> {
        let mut watch = self.state.subscribe();
        let older_answered = watch.wait_for(|s| s.unresolved.range(..generation).next().is_none());
        match tokio::time::timeout(timeout, older_answered).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(BusError::Closed),
            Err(_) => {
                self.unsent(key, id);
                return Err(BusError::ConfirmationLost(
                    "publishes sent on the previous connection are still unanswered; not sent, to keep order".into(),
                ));
            }
        }
        let mut refused = false;
        self.state.send_modify(|s| {
            s.lost.retain(|_, lost| lost.since.elapsed() < LOST_KEY_HOLD);
            let held = key.and_then(|k| s.lost.get_mut(k)).filter(|lost| !lost.events.contains(&id));
            if let Some(lost) = held {
                // Refused: it must not be overtaken either.
                lost.events.insert(id);
                refused = true;
            } else {
                *s.unresolved.entry(generation).or_default() += 1;
            }
        });
        if refused {
            return Err(BusError::ConfirmationLost(format!(
                "an earlier event of partition key {:?} was lost with a connection or refused by the broker, and \
                 not confirmed since; not sent, so that it cannot overtake it",
                key.unwrap_or_default()
            )));
        }
        Ok(Cleared { state: self.state.clone(), generation, key: key.map(str::to_owned), id, resolved: false })
    }

    /// Event `id` of key `key` could not be sent (no connection): it holds back its key like a lost one.
    pub(crate) fn unsent(&self, key: Option<&str>, id: Uuid) {
        if let Some(key) = key {
            self.state.send_modify(|s| mark_lost(s, key, id));
        }
    }
}

/// The broker answered a publish cleared on `generation`, or it could not be sent (`Answer::Lost`).
fn resolve(state: &watch::Sender<State>, generation: u64, key: Option<&str>, id: Uuid, answer: Answer) {
    state.send_modify(|s| {
        if let Some(count) = s.unresolved.get_mut(&generation) {
            *count -= 1;
            if *count == 0 {
                s.unresolved.remove(&generation);
            }
        }
        let Some(key) = key else { return };
        match answer {
            Answer::Lost => mark_lost(s, key, id),
            Answer::Confirmed => {
                if let Some(lost) = s.lost.get_mut(key) {
                    lost.events.remove(&id);
                    if lost.events.is_empty() {
                        s.lost.remove(key);
                    }
                }
            }
            Answer::Other => {}
        }
    });
}

fn mark_lost(state: &mut State, key: &str, id: Uuid) {
    let lost =
        state.lost.entry(key.to_owned()).or_insert_with(|| LostKey { events: HashSet::new(), since: Instant::now() });
    lost.events.insert(id);
    // The hold runs from the latest loss: a key whose event keeps being refused stays held.
    lost.since = Instant::now();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_lost_event_holds_back_its_key_until_it_is_published_again() {
        let order = PublishOrder::default();
        let (lost, refused, later) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let first = order.clear(Some("k"), lost, 1, SHORT).await.unwrap();
        // The connection is replaced: nothing goes out on the new one while the first is unanswered, and what
        // was refused holds back its key too.
        assert!(order.clear(Some("k"), refused, 2, SHORT).await.is_err());
        first.resolve(Answer::Lost);
        assert!(order.clear(Some("k"), later, 2, SHORT).await.is_err(), "would overtake the lost events");
        let other_key = order.clear(Some("j"), Uuid::now_v7(), 2, SHORT).await.expect("another key is not held back");
        other_key.resolve(Answer::Confirmed);
        let keyless = order.clear(None, Uuid::now_v7(), 2, SHORT).await.expect("no key, no order");
        keyless.resolve(Answer::Confirmed);
        // The caller publishes the held-back events again, in their order: they go, and once all are confirmed
        // the key flows again.
        let mut again = Vec::new();
        for id in [lost, refused, later] {
            again.push(order.clear(Some("k"), id, 2, SHORT).await.expect("a held-back event goes again"));
        }
        let extra = Uuid::now_v7();
        assert!(order.clear(Some("k"), extra, 2, SHORT).await.is_err(), "until they are confirmed");
        for cleared in again {
            cleared.resolve(Answer::Confirmed);
        }
        let last = order.clear(Some("k"), extra, 2, SHORT).await.expect("the last one refused goes again");
        last.resolve(Answer::Confirmed);
        order
            .clear(Some("k"), Uuid::now_v7(), 2, SHORT)
            .await
            .expect("then its key flows again")
            .resolve(Answer::Confirmed);
    }

    #[tokio::test]
    async fn without_a_loss_nothing_is_refused() {
        let order = PublishOrder::default();
        let first = order.clear(Some("k"), Uuid::now_v7(), 1, SHORT).await.unwrap();
        first.resolve(Answer::Confirmed);
        order
            .clear(Some("k"), Uuid::now_v7(), 2, SHORT)
            .await
            .expect("the older publish was confirmed")
            .resolve(Answer::Confirmed);
    }

    /// A publish whose future is dropped after the fence let it through (a caller's timeout) neither keeps the
    /// next connection's publishes waiting nor lets its key's later events overtake it.
    #[tokio::test]
    async fn a_cancelled_publish_resolves_as_lost() {
        let order = PublishOrder::default();
        let cancelled = Uuid::now_v7();
        drop(order.clear(Some("k"), cancelled, 1, SHORT).await.unwrap());
        order
            .clear(Some("j"), Uuid::now_v7(), 2, SHORT)
            .await
            .expect("the next connection does not wait")
            .resolve(Answer::Confirmed);
        assert!(order.clear(Some("k"), Uuid::now_v7(), 2, SHORT).await.is_err(), "its key waits for it");
        order.clear(Some("k"), cancelled, 2, SHORT).await.expect("it goes again").resolve(Answer::Confirmed);
    }
}

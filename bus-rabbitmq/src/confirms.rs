//! One ordered confirm path per channel: publishes on a confirm-mode channel are serialized (so delivery tags
//! follow publish order), and one task settles their answers in publish order, matching each `basic.return` to
//! its own message by message id.
//!
//! Why: lapin hands each `basic.return` to whichever confirm it settles next, and settles a `multiple` ack in
//! hash-map order, so with many confirms in flight the return of an unroutable message can come with another
//! message's confirm: the unroutable one would read as published (and be lost), a routable one as returned. The
//! broker sends a message's return before its ack, and lapin processes frames in order, so once a message's
//! ack has been processed its return is attached to a confirm already settled by lapin, at the latest in the
//! same ack frame. The settling task therefore waits for the oldest answer, then for a round trip on the same
//! channel (every frame before its reply, that ack frame included, has been processed by then), collects the
//! returns of every answered confirm, and only then tells each answered publish what became of it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use futures::FutureExt;
use lapin::options::{BasicPublishOptions, BasicQosOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{Mutex, mpsc, oneshot};

/// What the broker did with one publish.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Routed and confirmed: the broker has it.
    Confirmed,
    /// Returned (no queue took it, with `mandatory`).
    Returned,
    /// Refused (`basic.nack`).
    Nacked,
    /// The channel failed before an answer came.
    Failed(lapin::Error),
    /// The channel is not in confirm mode (a bug: every channel here is).
    NotRequested,
}

/// A confirm-mode channel with its ordered confirm path. Cheap to share (`Arc`).
pub(crate) struct ConfirmedChannel {
    channel: Channel,
    /// Held across each publish, so that tags and the settling queue follow one order.
    publishing: Mutex<mpsc::UnboundedSender<Pending>>,
}

struct Pending {
    message_id: Option<String>,
    confirm: PublisherConfirm,
    answer: oneshot::Sender<Outcome>,
}

/// Returns whose message is not answered yet are remembered at most this many (a message whose publish was
/// cancelled after it was sent is never answered).
const MAX_REMEMBERED_RETURNS: usize = 100_000;

/// A round trip that takes longer means a half-dead connection: settle what is answered anyway (its publishers
/// give up on their own deadline).
const BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ConfirmedChannel {
    /// Takes `channel`, already in confirm mode, and starts its settling task.
    pub(crate) fn new(channel: Channel) -> Arc<Self> {
        let (pending, queue) = mpsc::unbounded_channel();
        tokio::spawn(settle(channel.clone(), queue));
        Arc::new(Self { channel, publishing: Mutex::new(pending) })
    }

    /// The underlying channel (status, close).
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes one message; the receiver gets the broker's answer. Dropping the receiver does not cancel the
    /// publish. An error means it was not sent.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<oneshot::Receiver<Outcome>, lapin::Error> {
        let message_id = properties.message_id().as_ref().map(|id| id.as_str().to_owned());
        let pending = self.publishing.lock().await;
        let confirm =
            self.channel.basic_publish(exchange.into(), routing_key.into(), options, body, properties).await?;
        let (answer, answered) = oneshot::channel();
        // The settling task lives as long as this channel's sender: it cannot be gone here.
        let _ = pending.send(Pending { message_id, confirm, answer });
        Ok(answered)
    }
}

/// A publish in flight and, once lapin settled it, its raw answer.
struct InFlight {
    pending: Pending,
    answered: Option<Result<Confirmation, lapin::Error>>,
}

async fn settle(channel: Channel, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut returned: HashSet<String> = HashSet::new();
    let mut open = true;
    loop {
        // Wait until the oldest publish is answered, taking new ones in meanwhile.
        if in_flight.is_empty() {
            if !open {
                return;
            }
            match queue.recv().await {
                Some(pending) => in_flight.push_back(InFlight { pending, answered: None }),
                None => open = false,
            }
            continue;
        }
        if in_flight[0].answered.is_none() {
            let oldest = &mut in_flight[0];
            let next = tokio::select! {
                answer = &mut oldest.pending.confirm => {
                    remember_return(&answer, &mut returned);
                    oldest.answered = Some(answer);
                    None
                }
                next = queue.recv(), if open => Some(next),
            };
            match next {
                Some(Some(pending)) => in_flight.push_back(InFlight { pending, answered: None }),
                // Nothing more will be published; what is in flight still gets its answers.
                Some(None) => open = false,
                None => {}
            }
            if in_flight[0].answered.is_none() {
                continue;
            }
        }
        while let Ok(pending) = queue.try_recv() {
            in_flight.push_back(InFlight { pending, answered: None });
        }
        // Every frame before the reply to this has been processed: every return of an answered message is on
        // an answered confirm now. (A failed round trip means a dead channel, whose confirms all fail.)
        let barrier = channel.basic_qos(0, BasicQosOptions::default());
        let _ = tokio::time::timeout(BARRIER_TIMEOUT, barrier).await;
        for flight in &mut in_flight {
            if flight.answered.is_none() {
                flight.answered = (&mut flight.pending.confirm).now_or_never();
                if let Some(answered) = &flight.answered {
                    remember_return(answered, &mut returned);
                }
            }
        }
        while in_flight.front().is_some_and(|flight| flight.answered.is_some()) {
            let Some(InFlight { pending, answered: Some(answered) }) = in_flight.pop_front() else { break };
            let own_return = match &pending.message_id {
                Some(id) => returned.remove(id),
                // Nothing to match by: the return lapin gave this confirm, if it has no id either.
                None => matches!(
                    &answered,
                    Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message)))
                        if message.properties.message_id().is_none()
                ),
            };
            let outcome = match answered {
                Err(error) => Outcome::Failed(error),
                Ok(_) if own_return => Outcome::Returned,
                Ok(Confirmation::Ack(_)) => Outcome::Confirmed,
                Ok(Confirmation::Nack(_)) => Outcome::Nacked,
                Ok(Confirmation::NotRequested) => Outcome::NotRequested,
            };
            let _ = pending.answer.send(outcome);
        }
    }
}

/// Remembers the message a confirm came back with, by its id (without an id there is nothing to match it by: it
/// stays with the confirm lapin gave it to).
fn remember_return(answered: &Result<Confirmation, lapin::Error>, returned: &mut HashSet<String>) {
    if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) = answered
        && let Some(id) = message.properties.message_id()
    {
        if returned.len() >= MAX_REMEMBERED_RETURNS {
            returned.clear();
        }
        returned.insert(id.as_str().to_owned());
    }
}

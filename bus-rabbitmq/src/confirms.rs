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
//! channel (every frame before its reply, that ack frame included, has been processed by then), then takes the
//! publish turn (every message on the wire is in its queue then, newer ones included, whose confirms may carry
//! an older message's return), collects the returns of every answered confirm, and only then tells each
//! answered publish what became of it.
//!
//! Limits: a return is matched by the message id (a message without one keeps lapin's pairing); while the
//! connection is blocked by the broker (`connection.blocked`), the publish holding the turn cannot finish, so
//! answers wait too (callers give up after their confirm deadline and publish again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use lapin::options::{BasicPublishOptions, BasicQosOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::{Mutex, OwnedMutexGuard, mpsc, oneshot};

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
    /// Acknowledged, but the round trip that proves its return (if any) was seen failed or timed out: it may
    /// have been returned, so it must be treated as not confirmed (published again, never taken as delivered).
    Unchecked,
}

/// A confirm-mode channel with its ordered confirm path. Cheap to share (`Arc`).
pub(crate) struct ConfirmedChannel {
    channel: Channel,
    /// Held from a publish's first frame until its confirm is in the settling queue, so that tags and the queue
    /// follow one order, and taken by the settling task before it harvests returns: every message already on
    /// the wire is in its queue by then.
    publishing: Arc<Mutex<()>>,
    queue: mpsc::UnboundedSender<Pending>,
}

struct Pending {
    message_id: Option<String>,
    confirm: PublisherConfirm,
    answer: oneshot::Sender<Outcome>,
}

/// A round trip that takes longer means a half-dead connection: what is answered is settled, an ack as
/// [`Outcome::Unchecked`].
const BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ConfirmedChannel {
    /// Takes `channel`, already in confirm mode, and starts its settling task.
    pub(crate) fn new(channel: Channel) -> Arc<Self> {
        let (queue, settling) = mpsc::unbounded_channel();
        let publishing = Arc::new(Mutex::new(()));
        tokio::spawn(settle(channel.clone(), publishing.clone(), settling));
        Arc::new(Self { channel, publishing, queue })
    }

    /// The underlying channel (status, close).
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes one message; the receiver gets the broker's answer. Dropping this future (a caller's timeout)
    /// once the message may be on the wire finishes the hand-over in a task of its own, so that no message's
    /// confirm escapes the settling; dropping the receiver does not cancel the publish either. An error means it
    /// was not sent.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<oneshot::Receiver<Outcome>, lapin::Error> {
        let message_id = properties.message_id().as_ref().map(|id| id.as_str().to_owned());
        let turn = self.publishing.clone().lock_owned().await;
        let (channel, exchange, routing_key) = (self.channel.clone(), exchange.to_owned(), routing_key.to_owned());
        let sending: BoxFuture<'static, Result<PublisherConfirm, lapin::Error>> = Box::pin(async move {
            channel
                .basic_publish(exchange.as_str().into(), routing_key.as_str().into(), options, &body, properties)
                .await
        });
        let mut handover = Handover { turn: Some(turn), sending: Some(sending), queue: self.queue.clone(), message_id };
        let sent = match handover.sending.as_mut() {
            Some(sending) => sending.await,
            None => unreachable!("set just above"),
        };
        handover.sending = None;
        let confirm = sent?;
        let (answer, answered) = oneshot::channel();
        // The settling task lives as long as this channel's sender.
        let _ = handover.queue.send(Pending { message_id: handover.message_id.take(), confirm, answer });
        // Dropping the hand-over gives the turn to the next publish.
        Ok(answered)
    }
}

/// A publish between its turn and the hand-over of its confirm. Dropped half-way (the caller's future dropped),
/// it finishes in a task of its own: the message may be on the wire, so its confirm must reach the settling.
struct Handover {
    turn: Option<OwnedMutexGuard<()>>,
    sending: Option<BoxFuture<'static, Result<PublisherConfirm, lapin::Error>>>,
    queue: mpsc::UnboundedSender<Pending>,
    message_id: Option<String>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        let Some(sending) = self.sending.take() else { return };
        let (turn, queue, message_id) = (self.turn.take(), self.queue.clone(), self.message_id.take());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(confirm) = sending.await {
                    // Nobody waits for this answer; the settling still collects the returns it carries.
                    let (answer, _) = oneshot::channel();
                    let _ = queue.send(Pending { message_id, confirm, answer });
                }
                drop(turn);
            });
        }
    }
}

/// A publish in flight and, once lapin settled it, its raw answer.
struct InFlight {
    pending: Pending,
    answered: Option<Result<Confirmation, lapin::Error>>,
}

/// Returns not matched to their publish yet, by message id (counted: one event may be in flight twice).
type Returned = HashMap<String, usize>;

async fn settle(channel: Channel, publishing: Arc<Mutex<()>>, mut queue: mpsc::UnboundedReceiver<Pending>) {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    let mut returned = Returned::new();
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
        // Every frame read before the reply to this has been processed: the ack frames that settled the answered
        // confirms included, with every confirm they settled. (A failed round trip means a dead channel, whose
        // confirms all fail.)
        let barrier = channel.basic_qos(0, BasicQosOptions::default());
        let checked = matches!(tokio::time::timeout(BARRIER_TIMEOUT, barrier).await, Ok(Ok(())));
        // Then, with the publish turn held until the answers are given, every message on the wire is in the
        // queue: a confirm that carries an answered message's return (lapin may give it to a newer message of
        // the same ack frame) is harvested with the rest.
        let turn = publishing.lock().await;
        while let Ok(pending) = queue.try_recv() {
            in_flight.push_back(InFlight { pending, answered: None });
        }
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
                Some(id) => take_return(&mut returned, id),
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
                Ok(Confirmation::Ack(_)) if !checked => Outcome::Unchecked,
                Ok(Confirmation::Ack(_)) => Outcome::Confirmed,
                Ok(Confirmation::Nack(_)) => Outcome::Nacked,
                Ok(Confirmation::NotRequested) => Outcome::NotRequested,
            };
            let _ = pending.answer.send(outcome);
        }
        // A return belongs to a message on the wire, all in flight while the turn is held (it may be newer than
        // every confirm settled here: lapin may have handed its return to an older one). Forget the others:
        // their publish was settled without them (none should be left).
        if !returned.is_empty() {
            let flying: HashSet<&str> = in_flight.iter().filter_map(|f| f.pending.message_id.as_deref()).collect();
            returned.retain(|id, _| flying.contains(id.as_str()));
        }
        drop(turn);
    }
}

/// Remembers the message a confirm came back with, by its id (without an id there is nothing to match it by: it
/// stays with the confirm lapin gave it to).
fn remember_return(answered: &Result<Confirmation, lapin::Error>, returned: &mut Returned) {
    if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) = answered
        && let Some(id) = message.properties.message_id()
    {
        *returned.entry(id.as_str().to_owned()).or_default() += 1;
    }
}

/// Whether a return of message `id` is waiting, taking it.
fn take_return(returned: &mut Returned, id: &str) -> bool {
    match returned.get_mut(id) {
        Some(count) if *count > 1 => {
            *count -= 1;
            true
        }
        Some(_) => {
            returned.remove(id);
            true
        }
        None => false,
    }
}

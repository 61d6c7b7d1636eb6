//! [`Confirmation`]: the future that tells a publisher the bus has taken responsibility for an event.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::error::BusError;

/// Resolves when the bus has taken responsibility for one published event (`Ok`), or cannot (`Err`): a broker
/// publisher confirm, in the manner of rdkafka's `DeliveryFuture`.
///
/// Until it resolves `Ok`, the publisher must assume the event may be lost and keep it (the outbox keeps the row
/// pending). Many confirmations can be in flight at once: publish a batch, then await them. Dropping a
/// confirmation does not cancel the publish. An answer the bus forgets (its side dropped unanswered) resolves to
/// [`BusError::ConfirmationLost`], never to a success.
///
/// It is a oneshot receiver (or an answer known at once); transports make them with
/// [`transport::confirmation_channel`](crate::transport::confirmation_channel) and
/// [`transport::Countdown`](crate::transport::Countdown).
#[must_use = "a publish is only safe once its confirmation resolved Ok"]
pub struct Confirmation(State);

enum State {
    Ready(Option<Result<(), BusError>>),
    Waiting(oneshot::Receiver<Result<(), BusError>>),
}

impl Confirmation {
    /// An already confirmed publish.
    pub fn confirmed() -> Self {
        Self(State::Ready(Some(Ok(()))))
    }

    /// An already failed publish.
    pub fn failed(error: BusError) -> Self {
        Self(State::Ready(Some(Err(error))))
    }

    /// A confirmation answered by `future`, run as a task of its own on the current tokio runtime (so it goes
    /// on whether or not the confirmation is awaited, until the confirmation is dropped): for buses that wrap
    /// another bus, test doubles.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn from_future(future: impl Future<Output = Result<(), BusError>> + Send + 'static) -> Self {
        let (mut answer, confirmation) = channel();
        tokio::spawn(async move {
            tokio::select! {
                result = future => {
                    let _ = answer.send(result);
                }
                // Nobody waits for the answer any more (the confirmation was dropped): stop.
                () = answer.closed() => {}
            }
        });
        confirmation
    }
}

/// A channel pair: answer through the sender, hand the confirmation to the publisher.
pub(crate) fn channel() -> (oneshot::Sender<Result<(), BusError>>, Confirmation) {
    let (tx, rx) = oneshot::channel();
    (tx, Confirmation(State::Waiting(rx)))
}

impl Future for Confirmation {
    type Output = Result<(), BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Ready(result) => Poll::Ready(
                result.take().unwrap_or_else(|| Err(BusError::ConfirmationLost("polled after completion".into()))),
            ),
            State::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(BusError::ConfirmationLost("the bus dropped the event unanswered".into())))
            }),
        }
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            State::Ready(_) => "ready",
            State::Waiting(_) => "pending",
        };
        f.debug_tuple("Confirmation").field(&state).finish()
    }
}

struct Shared {
    state: Mutex<CountdownState>,
}

struct CountdownState {
    remaining: usize,
    handles: usize,
    answer: Option<oneshot::Sender<Result<(), BusError>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CountdownState> {
        // Nothing panics while holding this lock; a poisoned one still holds consistent data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answers with `result` unless answered already.
    fn answer(&self, result: Result<(), BusError>) {
        let answer = {
            let mut state = self.lock();
            state.remaining = 0;
            state.answer.take()
        };
        if let Some(answer) = answer {
            let _ = answer.send(result);
        }
    }
}

/// A confirmation with several parties (e.g. one per consumer group): `Ok` once every party is
/// [done](Self::part_done), `Err` at the first [failure](Self::fail), [`BusError::ConfirmationLost`] if every
/// handle is dropped first (a forgotten answer is never a success). Clone it for each party. One allocation,
/// whatever the number of parties.
pub struct Countdown(Arc<Shared>);

impl Countdown {
    /// A countdown of `parties` parts and the confirmation it answers (zero parts: confirmed at once).
    pub fn new(parties: usize) -> (Self, Confirmation) {
        if parties == 0 {
            let shared = Shared { state: Mutex::new(CountdownState { remaining: 0, handles: 1, answer: None }) };
            return (Self(Arc::new(shared)), Confirmation::confirmed());
        }
        let (answer, confirmation) = channel();
        let state = CountdownState { remaining: parties, handles: 1, answer: Some(answer) };
        (Self(Arc::new(Shared { state: Mutex::new(state) })), confirmation)
    }

    /// One part is done; the last one resolves the confirmation `Ok`.
    pub fn part_done(&self) {
        let answer = {
            let mut state = self.0.lock();
            if state.remaining == 0 {
                return;
            }
            state.remaining -= 1;
            if state.remaining > 0 {
                return;
            }
            state.answer.take()
        };
        if let Some(answer) = answer {
            let _ = answer.send(Ok(()));
        }
    }

    /// Resolves the confirmation with `error` (the first failure wins; no effect once resolved).
    pub fn fail(&self, error: BusError) {
        self.0.answer(Err(error));
    }
}

impl Clone for Countdown {
    fn clone(&self) -> Self {
        self.0.lock().handles += 1;
        Self(self.0.clone())
    }
}

impl Drop for Countdown {
    fn drop(&mut self) {
        let last = {
            let mut state = self.0.lock();
            state.handles -= 1;
            state.handles == 0 && state.remaining > 0
        };
        if last {
            self.0.answer(Err(BusError::ConfirmationLost("every party dropped its part unanswered".into())));
        }
    }
}

impl fmt::Debug for Countdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Countdown").field("remaining", &self.0.lock().remaining).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropped_sender_is_an_error_not_a_success() {
        let (tx, confirmation) = channel();
        drop(tx);
        assert!(matches!(confirmation.await, Err(BusError::ConfirmationLost(_))));
    }

    #[tokio::test]
    async fn countdown_resolves_after_every_part() {
        let (first, confirmation) = Countdown::new(2);
        let second = first.clone();
        let waiting = tokio::spawn(confirmation);
        first.part_done();
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        second.part_done();
        assert!(waiting.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn countdown_with_a_part_dropped_unanswered_fails() {
        let (first, confirmation) = Countdown::new(2);
        let second = first.clone();
        first.part_done();
        drop(first);
        drop(second);
        assert!(matches!(confirmation.await, Err(BusError::ConfirmationLost(_))));
    }

    #[tokio::test]
    async fn countdown_first_failure_wins() {
        let (part, confirmation) = Countdown::new(3);
        part.fail(BusError::Closed);
        part.part_done();
        part.part_done();
        assert!(matches!(confirmation.await, Err(BusError::Closed)));
        let (_part, nothing_to_wait_for) = Countdown::new(0);
        assert!(nothing_to_wait_for.await.is_ok());
    }

    #[tokio::test]
    async fn answered_through_the_channel() {
        let (tx, confirmation) = channel();
        tx.send(Ok(())).unwrap();
        assert!(confirmation.await.is_ok());
        assert!(Confirmation::failed(BusError::Closed).await.is_err());
        assert!(Confirmation::from_future(async { Ok(()) }).await.is_ok());
    }
}

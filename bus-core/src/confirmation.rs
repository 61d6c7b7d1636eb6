//! [`Confirmation`]: the future that tells a publisher the bus has taken responsibility for an event.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::error::BusError;

/// Resolves when the bus has taken responsibility for one published event (`Ok`), or cannot (`Err`): a broker
/// publisher confirm, in the manner of rdkafka's `DeliveryFuture`.
///
/// Until it resolves `Ok`, the publisher must assume the event may be lost and keep it (the outbox keeps the row
/// pending). Many confirmations can be in flight at once: publish a batch, then await them. Dropping a
/// confirmation does not cancel the publish.
#[must_use = "a publish is only safe once its confirmation resolved Ok"]
pub struct Confirmation(State);

enum State {
    Ready(Option<Result<(), BusError>>),
    Waiting(oneshot::Receiver<Result<(), BusError>>),
    Future(BoxFuture<'static, Result<(), BusError>>),
    Countdown(Arc<Shared>),
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

    /// A confirmation answered through a channel; a dropped sender resolves to [`BusError::ConfirmationLost`].
    pub fn from_receiver(receiver: oneshot::Receiver<Result<(), BusError>>) -> Self {
        Self(State::Waiting(receiver))
    }

    /// A confirmation answered by a future.
    pub fn from_future(future: impl Future<Output = Result<(), BusError>> + Send + 'static) -> Self {
        Self(State::Future(Box::pin(future)))
    }

    /// A confirmation that resolves `Ok` once `parties` parts are done (e.g. one per consumer group), or `Err` at
    /// the first failure, or [`BusError::ConfirmationLost`] if every [`Countdown`] handle is dropped first. One
    /// allocation, whatever the number of parties.
    pub fn countdown(parties: usize) -> (Countdown, Self) {
        let shared = Arc::new(Shared {
            state: Mutex::new(CountdownState { remaining: parties, handles: 1, result: None, waker: None }),
        });
        if parties == 0 {
            shared.lock().result = Some(Ok(()));
        }
        (Countdown(shared.clone()), Self(State::Countdown(shared)))
    }

    /// A channel pair: answer through the sender, hand the confirmation to the publisher.
    pub fn channel() -> (oneshot::Sender<Result<(), BusError>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self::from_receiver(rx))
    }
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
            State::Future(fut) => fut.as_mut().poll(cx),
            State::Countdown(shared) => {
                let mut state = shared.lock();
                match state.result.take() {
                    Some(result) => {
                        state.result = Some(Err(BusError::ConfirmationLost("polled after completion".into())));
                        Poll::Ready(result)
                    }
                    None => {
                        state.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            State::Ready(_) => "ready",
            State::Waiting(_) | State::Future(_) | State::Countdown(_) => "pending",
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
    result: Option<Result<(), BusError>>,
    waker: Option<Waker>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, CountdownState> {
        // Nothing panics while holding this lock; a poisoned one still holds consistent data.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn settle(&self, result: Result<(), BusError>) {
        let waker = {
            let mut state = self.lock();
            if state.result.is_some() || state.remaining == 0 && result.is_err() {
                return;
            }
            state.result = Some(result);
            state.remaining = 0;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The answering side of [`Confirmation::countdown`]. Clone it for each party; every party calls
/// [`part_done`](Self::part_done) or [`fail`](Self::fail). Dropping every handle before all parts are done
/// resolves the confirmation to [`BusError::ConfirmationLost`]: a forgotten answer is never a success.
pub struct Countdown(Arc<Shared>);

impl Countdown {
    /// One part is done; the last one resolves the confirmation `Ok`.
    pub fn part_done(&self) {
        let waker = {
            let mut state = self.0.lock();
            if state.remaining == 0 || state.result.is_some() {
                return;
            }
            state.remaining -= 1;
            if state.remaining > 0 {
                return;
            }
            state.result = Some(Ok(()));
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Resolves the confirmation with `error` (the first failure wins; no effect once resolved).
    pub fn fail(&self, error: BusError) {
        self.0.settle(Err(error));
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
            self.0.settle(Err(BusError::ConfirmationLost("every party dropped its part unanswered".into())));
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
        let (tx, confirmation) = Confirmation::channel();
        drop(tx);
        assert!(matches!(confirmation.await, Err(BusError::ConfirmationLost(_))));
    }

    #[tokio::test]
    async fn countdown_resolves_after_every_part() {
        let (first, confirmation) = Confirmation::countdown(2);
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
        let (first, confirmation) = Confirmation::countdown(2);
        let second = first.clone();
        first.part_done();
        drop(first);
        drop(second);
        assert!(matches!(confirmation.await, Err(BusError::ConfirmationLost(_))));
    }

    #[tokio::test]
    async fn countdown_first_failure_wins() {
        let (part, confirmation) = Confirmation::countdown(3);
        part.fail(BusError::Closed);
        part.part_done();
        part.part_done();
        assert!(matches!(confirmation.await, Err(BusError::Closed)));
        let (_part, nothing_to_wait_for) = Confirmation::countdown(0);
        assert!(nothing_to_wait_for.await.is_ok());
    }

    #[tokio::test]
    async fn answered_through_the_channel() {
        let (tx, confirmation) = Confirmation::channel();
        tx.send(Ok(())).unwrap();
        assert!(confirmation.await.is_ok());
        assert!(Confirmation::failed(BusError::Closed).await.is_err());
        assert!(Confirmation::from_future(async { Ok(()) }).await.is_ok());
    }
}
